"""BLIP-2 end to end: frozen image encoder -> Q-Former -> projection -> frozen language model (paper Fig. 3).

    pixel_values (B, 3, H, W)
      -> encode_image  (B, P, Dv)    frozen ViT-g (vit.py), P = 257 at 224 px
      -> query         (B, Q, Dq)    32 learned queries read the image through the Q-Former (qformer.py)
      -> project       (B, Q, Dlm)   one Linear into the LLM's embedding space (projection.py)
      -> language model              OPT continues [queries; prompt] (opt.py) or Flan-T5 encodes it and
                                     decodes the answer (t5.py)

Each arrow is a plain method a notebook can call one by one. The retrieval checkpoints (blip2-itm-vit-g) have
no language model: instead the Q-Former's outputs are compared with text in a shared 256-d space (ITC) or
classified as match / no match (ITM); those methods are at the end of the class.

Mixed precision is a per-stage choice (the paper ran the ViT and LLM in half precision and the Q-Former in
fp32), so every stage boundary below casts its input to the dtype of the stage it enters.

Notation: B batch, P image tokens, Dv vision width, Q queries, Dq Q-Former width, T prompt tokens,
Dlm language-model width, V vocabulary, E retrieval embedding size (256).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import decode
from .config import Blip2Config
from .opt import OPT
from .projection import insert_queries, prepend_queries
from .qformer import QFormer, stage1_attention_mask
from .t5 import T5
from .vit import VisionTransformer

DEFAULT_NEW_TOKENS = 20  # generate() without max_new_tokens, as transformers' generate (its max_length=20)


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class Blip2(nn.Module):
    def __init__(self, config: Blip2Config):
        super().__init__()
        self.config = config
        Q, Dq = config.num_query_tokens, config.qformer_config.hidden_size
        self.vision_model = VisionTransformer(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, Q, Dq))
        self.qformer = QFormer(config.qformer_config)
        if config.text_config is None:
            # Retrieval heads (stage-1 checkpoints): a shared space for ITC, and a 2-way ITM classifier.
            E = config.image_text_hidden_size
            self.vision_projection = nn.Linear(Dq, E)
            self.text_projection = nn.Linear(Dq, E)
            self.itm_head = nn.Linear(Dq, 2)
            self.language_model = None
        else:
            if config.use_decoder_only_language_model:
                self.language_model = OPT(config.text_config)
                lm_width = config.text_config.hidden_size
            else:
                self.language_model = T5(config.text_config)
                lm_width = config.text_config.d_model
            self.language_projection = nn.Linear(Dq, lm_width)

    @property
    def is_encoder_decoder(self) -> bool:
        return self.language_model is not None and not self.config.use_decoder_only_language_model

    # ---- the stages, one method each ------------------------------------------------------------------

    def encode_image(self, pixel_values, interpolate_pos_encoding=False, **extras):
        """(B, 3, H, W) -> (B, P, Dv) frozen image features (after the ViT's final LayerNorm)."""
        return self.vision_model(pixel_values, interpolate_pos_encoding, **extras)

    def query(self, image_embeds, **extras):
        """(B, P, Dv) -> (B, Q, Dq): the learned queries after the Q-Former (queries only, no text)."""
        if image_embeds.ndim != 3 or image_embeds.shape[-1] != self.config.vision_config.hidden_size:
            raise ValueError(f"query: expected image_embeds (B, P, {self.config.vision_config.hidden_size}), "
                             f"got {tuple(image_embeds.shape)}")
        dtype = _dtype_of(self.qformer)
        queries = self.query_tokens.to(dtype).expand(image_embeds.shape[0], -1, -1)  # (B, Q, Dq)
        return self.qformer(queries, image_embeds.to(dtype), **extras)

    def project(self, query_output):
        """(B, Q, Dq) -> (B, Q, Dlm) soft visual prompt for the language model."""
        if self.language_model is None:
            raise ValueError("project: a retrieval checkpoint has no language model to project into; use "
                             "image_embeds() / itc() / itm()")
        if query_output.ndim != 3 or query_output.shape[-1] != self.language_projection.in_features:
            raise ValueError(f"project: expected query_output (B, Q, {self.language_projection.in_features}), "
                             f"got {tuple(query_output.shape)}")
        return self.language_projection(query_output.to(self.language_projection.weight.dtype))

    def image_prompt(self, pixel_values, interpolate_pos_encoding=False):
        """The three image stages in one call: (B, 3, H, W) -> (B, Q, Dlm)."""
        return self.project(self.query(self.encode_image(pixel_values, interpolate_pos_encoding)))

    def language_model_inputs(self, visual_prompt, input_ids=None, attention_mask=None):
        """Place the projected queries (B, Q, Dlm) into the LLM input. Returns inputs_embeds (B, L, Dlm) and the
        attention mask (B, L), where L = T with `<image>` slots (current layout) or Q + T (older layout).

        With no input_ids: plain captioning. The prompt is then what the checkpoint's processor writes for an
        empty text: `<image>` x Q + BOS for OPT; `<image>` x Q + EOS for Flan-T5 (its tokenizer appends EOS to
        every text, the empty one too; LAVIS fed T5 the same)."""
        B, Q, _ = visual_prompt.shape
        lm, cfg = self.language_model, self.config
        if input_ids is None:
            text = cfg.text_config
            start = [text.eos_token_id] if self.is_encoder_decoder else [text.bos_token_id]
            slots = [cfg.image_token_index] * Q if cfg.image_token_index is not None else []
            input_ids = torch.tensor([slots + start], device=visual_prompt.device).expand(B, -1)
        if input_ids.ndim != 2 or input_ids.shape[0] != B:
            raise ValueError(f"prompt: expected input_ids (B={B}, T), got {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = lm.embed_tokens(input_ids)  # (B, T, Dlm)
        embeds = embeds.to(_dtype_of(lm))
        if cfg.image_token_index is not None:
            return insert_queries(embeds, input_ids, visual_prompt, cfg.image_token_index), attention_mask
        return prepend_queries(embeds, attention_mask, visual_prompt)

    def forward(self, pixel_values, input_ids=None, attention_mask=None, decoder_input_ids=None,
                interpolate_pos_encoding=False):
        """Logits of the language model: OPT (B, L, V) over the whole input; Flan-T5 (B, t, V) over the
        decoder_input_ids (default: the decoder start token alone)."""
        if self.language_model is None:
            raise ValueError("this is a retrieval checkpoint (no language model): use itm() / itc()")
        attention_mask = self._check_inputs(pixel_values, input_ids, attention_mask)
        visual_prompt = self.image_prompt(pixel_values, interpolate_pos_encoding)
        embeds, mask = self.language_model_inputs(visual_prompt, input_ids, attention_mask)
        if not self.is_encoder_decoder:
            return self.language_model(embeds, mask)
        if decoder_input_ids is None:
            start = self.config.text_config.decoder_start_token_id
            decoder_input_ids = torch.full((embeds.shape[0], 1), start, device=embeds.device)
        return self.language_model(embeds, mask, decoder_input_ids)

    # ---- generation -------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, pixel_values, input_ids=None, attention_mask=None, *, max_new_tokens=None, min_new_tokens=0,
                 num_beams=1, length_penalty=1.0, early_stopping=False, do_sample=False, temperature=1.0, top_k=50,
                 top_p=1.0, repetition_penalty=1.0, num_return_sequences=1, eos_token_id="checkpoint",
                 generator=None, interpolate_pos_encoding=False):
        """Caption / answer: returns only the new tokens, (B * num_return_sequences, T_new), padded with the
        pad id after EOS. `input_ids` as the checkpoint's processor lays them out; None = plain captioning.
        Options left out mean what they mean in the reference's generate() on these checkpoints:
          max_new_tokens  None = 20 (OPT: fewer if the position table ends sooner)
          top_k           50, when sampling (0 = off)
          eos_token_id    "checkpoint" = the checkpoint's end token (text_config.eos_token_id); one id or a
                          list stops at those; None stops at none (exactly max_new_tokens tokens)
        The other options are decode.generate's."""
        if self.language_model is None:
            raise ValueError("this is a retrieval checkpoint (no language model): it cannot generate text")
        text_cfg = self.config.text_config
        attention_mask = self._check_inputs(pixel_values, input_ids, attention_mask)
        if attention_mask is not None:
            if not self.is_encoder_decoder and not bool(attention_mask[:, -1].bool().all()):
                # OPT continues after the last position: a right-padded row would continue after its pads.
                raise ValueError("generate: right-padded prompts (a row of attention_mask ends in 0); OPT continues "
                                 "after the last position, so pad on the left (the processor's default for OPT)")
            if self.is_encoder_decoder and bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
                # T5's relative positions ignore the mask: pads between the image slots and the text move the text.
                raise ValueError("generate: left-padded prompts; Flan-T5's relative positions ignore the mask, so pad "
                                 "on the right (the processor's default for Flan-T5)")
        visual_prompt = self.image_prompt(pixel_values, interpolate_pos_encoding)
        embeds, mask = self.language_model_inputs(visual_prompt, input_ids, attention_mask)
        default_length = max_new_tokens is None
        if self.is_encoder_decoder:
            session = T5Session(self.language_model, embeds, mask, text_cfg.decoder_start_token_id)
            prompt_ids = torch.full((embeds.shape[0], 1), text_cfg.decoder_start_token_id, device=embeds.device)
            prompt_mask = None
            max_new_tokens = DEFAULT_NEW_TOKENS if max_new_tokens is None else max_new_tokens
        else:
            limit, T0 = text_cfg.max_position_embeddings, embeds.shape[1]  # the prompt, image slots included
            if max_new_tokens is None:  # the reference's default: 20 new tokens, the prompt + them within the table
                max_new_tokens = min(DEFAULT_NEW_TOKENS, limit - T0)
                if max_new_tokens < 1:
                    raise ValueError(f"a prompt of {T0} tokens (image slots included) leaves none of the language "
                                     f"model's {limit} positions for new tokens; shorten the prompt")
            # The last new token is never fed back, so it needs no position (decode checks max_new_tokens' type).
            if isinstance(max_new_tokens, int) and T0 + max_new_tokens - 1 > limit:
                raise ValueError(f"a prompt of {T0} tokens (image slots included) and {max_new_tokens} new tokens "
                                 f"need {T0 + max_new_tokens - 1} positions; the language model has {limit}; "
                                 "lower max_new_tokens or shorten the prompt")
            session = OPTSession(self.language_model, embeds, mask)
            prompt_ids = input_ids if input_ids is not None else self.default_prompt_ids(embeds)
            prompt_mask = attention_mask
        if default_length and isinstance(min_new_tokens, int) and min_new_tokens > max_new_tokens:
            raise ValueError(f"generate: min_new_tokens={min_new_tokens} exceeds the default max_new_tokens "
                             f"({max_new_tokens}); pass max_new_tokens as well")
        return decode.generate(
            session, prompt_ids, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
            num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping, do_sample=do_sample,
            temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
            num_return_sequences=num_return_sequences,
            eos_token_id=text_cfg.eos_token_id if isinstance(eos_token_id, str) and eos_token_id == "checkpoint"
            else eos_token_id,
            pad_token_id=text_cfg.pad_token_id, generator=generator, prompt_mask=prompt_mask,
            vocab_size=text_cfg.vocab_size)

    def _check_inputs(self, pixel_values, input_ids, attention_mask):
        """The caller's tensors, checked where a mistake would fail deep inside torch (or not at all); returns
        the attention mask as integers (a float 0/1 mask, which the reference accepts, means the same)."""
        device = self.query_tokens.device
        for name, t in (("pixel_values", pixel_values), ("input_ids", input_ids), ("attention_mask", attention_mask)):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch tensor, got {type(t).__name__}; "
                                "use processor(..., return_tensors='pt')")
            if t.device != device:
                raise ValueError(f"{name} is on {t.device}, the model on {device}: move the inputs there, "
                                 f"e.g. inputs.to({str(device)!r})")
        if input_ids is not None:
            if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
                raise TypeError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
            V = self.config.text_config.vocab_size  # the embedding table's rows
            outside = input_ids[(input_ids < 0) | (input_ids >= V)].unique().tolist()
            if outside:
                raise ValueError(f"input_ids {outside[:5]} are outside the vocabulary (0..{V - 1}); were they made by "
                                 "another model's tokenizer?")
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.long()
        return attention_mask

    def default_prompt_ids(self, embeds):
        """The ids the reference puts in front of a caption when no prompt is given: `<image>` x Q + BOS. The
        decoder needs them for the repetition penalty, which the reference applies over the whole input."""
        cfg = self.config
        slots = [cfg.image_token_index] * cfg.num_query_tokens if cfg.image_token_index is not None else []
        ids = torch.tensor([slots + [cfg.text_config.bos_token_id]], device=embeds.device)
        return ids.expand(embeds.shape[0], -1)

    # ---- retrieval (stage-1 checkpoints) ---------------------------------------------------------------
    #
    # Text comes in either of two layouts, and every method below accepts both:
    #   plain      the Q-Former tokenizer's ids, "[CLS] a dog on a beach [SEP] [PAD] ..."          (B, T)
    #   processor  what the checkpoint's processor writes when given images *and* text: Q `<image>` ids
    #              (config.image_token_index) in front of the plain ids                           (B, Q + T)
    # The `<image>` slots mean nothing to the Q-Former: its queries are the learned query tokens, not text
    # ids (the `<image>` id is even one past the end of its vocabulary). The reference drops the first Q ids
    # whenever the config has an image_token_index; here they are dropped only when they are `<image>` ids,
    # so plain ids work with every config.

    def image_embeds(self, pixel_values):
        """(B, 3, H, W) -> (B, Q, E): each query's output projected to the shared space and L2-normalised."""
        q = self.query(self.encode_image(pixel_values))  # (B, Q, Dq)
        return F.normalize(self.vision_projection(q.to(self.vision_projection.weight.dtype)), dim=-1)

    def text_embeds(self, input_ids, attention_mask=None):
        """(B, T) ids -> (B, T, E) normalised; row 0 ([CLS]) is the sentence embedding. The text is encoded
        alone (the "unimodal" mask of ITC: it never sees the queries). Processor-layout ids give (B, T) rows
        for their T text ids."""
        input_ids, attention_mask = self._check_text(input_ids, attention_mask)
        h = self.qformer(input_ids=input_ids, attention_mask=attention_mask)  # (B, T, Dq)
        return F.normalize(self.text_projection(h.to(self.text_projection.weight.dtype)), dim=-1)

    def itc(self, pixel_values, input_ids, attention_mask=None):
        """Image-text contrastive similarity (B_img, B_txt): for each pair, the highest cosine similarity
        between any of the Q image query embeddings and the text's [CLS] embedding (paper section 3.2)."""
        img = self.image_embeds(pixel_values)  # (Bi, Q, E)
        txt = self.text_embeds(input_ids, attention_mask)[:, 0]  # (Bt, E)
        return (img @ txt.T).max(dim=1).values  # (Bi, Q, E) @ (E, Bt) -> (Bi, Q, Bt) -> (Bi, Bt)

    def itm(self, pixel_values, input_ids, attention_mask=None):
        """Image-text matching logits (B, 2) [no match, match] for image b with text b: queries and text attend
        to each other (bidirectional mask), the ITM head scores every query output, the scores are averaged.
        One image (1, 3, H, W) is scored against each of the B texts (its ViT features are computed once)."""
        input_ids, attention_mask = self._check_text(input_ids, attention_mask)
        B, Q = input_ids.shape[0], self.config.num_query_tokens
        if pixel_values.shape[0] not in (1, B):
            raise ValueError(f"itm: {pixel_values.shape[0]} images but {B} texts; ITM scores image b with text b, "
                             "so give as many images as texts (or one image for all texts)")
        image_embeds = self.encode_image(pixel_values).expand(B, -1, -1)  # (B, P, Dv)
        dtype = _dtype_of(self.qformer)
        queries = self.query_tokens.to(dtype).expand(B, -1, -1)  # (B, Q, Dq)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        allowed = stage1_attention_mask("bidirectional", Q, mask)  # (B, Q+T, Q+T)
        h = self.qformer(queries, image_embeds.to(dtype), input_ids=input_ids, attention_mask=allowed)
        return self.itm_head(h[:, :Q].to(self.itm_head.weight.dtype)).mean(dim=1)  # (B, Q, 2) -> (B, 2)

    def _check_text(self, input_ids, attention_mask):
        """Check retrieval text input and return it in the plain layout: (B, T) ids and mask (or None)."""
        if self.language_model is not None or self.qformer.embeddings is None:
            raise ValueError("retrieval needs a checkpoint with Q-Former text weights (blip2-itm-vit-g)")
        if input_ids.ndim != 2:
            raise ValueError(f"text: expected input_ids (B, T), got {tuple(input_ids.shape)}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"text: attention_mask {tuple(attention_mask.shape)} does not match "
                             f"input_ids {tuple(input_ids.shape)}")
        Q, image_id = self.config.num_query_tokens, self.config.image_token_index
        if image_id is not None and input_ids.shape[1] >= Q and bool((input_ids[:, :Q] == image_id).all()):
            input_ids = input_ids[:, Q:]  # processor layout -> plain layout
            attention_mask = None if attention_mask is None else attention_mask[:, Q:]
        if input_ids.shape[1] == 0 or (attention_mask is not None and not bool(attention_mask.any(dim=1).all())):
            raise ValueError("text: empty text (no tokens); give at least one word")
        if attention_mask is not None and not bool(attention_mask[:, 0].bool().all()):
            raise ValueError("text: left-padded text; retrieval reads each text's first token ([CLS]), so pad on the "
                             "right (processor.tokenizer.padding_side = 'right')")
        V = self.qformer.embeddings.word_embeddings.num_embeddings
        outside = input_ids[(input_ids < 0) | (input_ids >= V)].unique().tolist()
        if outside:
            hint = (f"; the {Q} `<image>` ids ({image_id}) of the processor layout must all come first"
                    if image_id in outside else "")
            raise ValueError(f"text: ids {outside[:5]} are outside the Q-Former vocabulary (0..{V - 1}){hint}")
        return input_ids, attention_mask


class OPTSession:
    """decode.DecodingSession for OPT: the prompt is run once into a KV cache, then one token per step."""

    def __init__(self, lm: OPT, inputs_embeds, attention_mask):
        self.lm, self.embeds, self.mask = lm, inputs_embeds, attention_mask
        self.cache = lm.new_cache()

    def prefill(self):
        return self.lm(self.embeds, self.mask, self.cache, last_only=True)[:, -1]  # (N, V) logits after the prompt

    def step(self, tokens):
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        embeds = self.lm.embed_tokens(tokens[:, None])  # (N, 1, D)
        return self.lm(embeds, self.mask, self.cache, last_only=True)[:, -1]

    def reorder(self, index):
        self.cache.reorder(index)
        self.mask = self.mask.index_select(0, index)


class T5Session:
    """decode.DecodingSession for Flan-T5: the encoder runs once; the decoder starts from its start token and
    caches its own keys/values (the cross-attention keys/values of the encoder output are computed once)."""

    def __init__(self, lm: T5, inputs_embeds, attention_mask, decoder_start_token_id: int):
        self.lm, self.embeds, self.mask, self.start = lm, inputs_embeds, attention_mask, decoder_start_token_id
        self.cache = lm.new_cache()

    def prefill(self):
        self.encoded = self.lm.encode(self.embeds, self.mask)  # (N, S, D)
        start = torch.full((self.embeds.shape[0], 1), self.start, device=self.embeds.device)
        return self.lm.decode(start, self.encoded, self.mask, self.cache)[:, -1]

    def step(self, tokens):
        return self.lm.decode(tokens[:, None], self.encoded, self.mask, self.cache)[:, -1]

    def reorder(self, index):
        self.cache.reorder(index)
        self.encoded = self.encoded.index_select(0, index)
        self.mask = self.mask.index_select(0, index)
