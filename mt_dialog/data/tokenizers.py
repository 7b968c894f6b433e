"""Tokenizers behind one small interface.

The pipeline needs only: encode text without adding special tokens, decode ids, look up a special
token by its piece (``"<|im_end|>"``), the vocabulary size and an identity (type, path, file hash)
to record in the dataset metadata. Two back-ends:

- SentencePiece (the default ``--tokenizer-type sentencepiece --tokenizer-model path.model``);
- Hugging Face (``--tokenizer-type huggingface --tokenizer-path DIR``, the ``hf`` extra).

Special tokens a template needs but the vocabulary lacks (``<|im_start|>`` on a Llama 2 model) are
*appended*: they get ids ``vocab_size, vocab_size + 1, ...``; the model's embedding must then cover
``vocab_size`` (the extended size recorded in the metadata). They are never encoded as text.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Set

import numpy as np


class TokenizerError(ValueError):
    """A tokenizer could not be loaded or lacks something the pipeline needs."""


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file (tokenizer identity, dataset file checksums), read through one
    fixed buffer (``hashlib.file_digest``): memory does not grow with the file."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


@dataclass
class TokenizerInfo:
    """What the metadata records about a tokenizer."""

    type: str
    path: str
    base_vocab_size: int
    vocab_size: int
    sha256: str
    added_tokens: Dict[str, int] = field(default_factory=dict)


class DialogTokenizer:
    """Base class: subclasses implement ``_encode``, ``_decode``, ``_piece_to_id``."""

    type_name = "base"

    def __init__(self, path: str, base_vocab_size: int, sha256: str) -> None:
        self.path = path
        self.base_vocab_size = base_vocab_size
        self.sha256 = sha256
        self.added_tokens: Dict[str, int] = {}

    # -- back-end hooks ----------------------------------------------------------------------
    def _encode(self, text: str) -> List[int]:
        raise NotImplementedError

    def _decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def _piece_to_id(self, piece: str) -> Optional[int]:
        raise NotImplementedError

    bos_id: Optional[int] = None
    eos_id: Optional[int] = None
    unk_id: Optional[int] = None

    def _special_ids(self) -> Set[int]:
        """Ids of the back-end's own special (control) tokens."""
        raise NotImplementedError

    @property
    def pad_id(self) -> int:
        """Id written in padding (never trained, never attended across): eos, else 0."""
        return self.eos_id if self.eos_id is not None else 0

    # -- public API --------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Size of the id space, appended special tokens included."""
        return self.base_vocab_size + len(self.added_tokens)

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text``; never adds BOS/EOS."""
        return self._encode(text) if text else []

    batch_encoding = False
    """True when ``encode_many`` is faster than ``encode`` text by text (the renderers then
    encode the texts of a whole batch of records in one call)."""

    def encode_many(self, texts: Sequence[str]) -> List[List[int]]:
        """``[encode(text) for text in texts]``, in one call where the back-end allows it."""
        return [self.encode(text) for text in texts]

    def document_prefix(self) -> List[int]:
        """Ids put before a plain-text document's text, as this tokenizer expects: for
        SentencePiece its BOS when it defines one (Llama's convention); a Hugging Face tokenizer
        overrides it with what it adds itself."""
        return [self.bos_id] if self.bos_id is not None else []

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; appended special tokens decode to their piece."""
        out: List[str] = []
        run: List[int] = []
        reverse = {v: k for k, v in self.added_tokens.items()}
        for token in ids:
            token = int(token)
            if token in reverse:
                if run:
                    out.append(self._decode(run))
                    run = []
                out.append(reverse[token])
            else:
                run.append(token)
        if run:
            out.append(self._decode(run))
        return "".join(out)

    def id_to_piece(self, token: int) -> str:
        """The vocabulary piece of one id (debug views)."""
        reverse = {v: k for k, v in self.added_tokens.items()}
        return reverse.get(int(token)) or self._id_to_piece(int(token))

    def _id_to_piece(self, token: int) -> str:
        return self._decode([token])

    def special_ids(self) -> Set[int]:
        """Ids of every special token: the vocabulary's own (control tokens, bos, eos, ...;
        decoders usually hide them) and the appended ones."""
        found = self._special_ids() | set(self.added_tokens.values())
        return found | {t for t in (self.bos_id, self.eos_id, self.unk_id) if t is not None}

    def special_id(self, piece: str, allow_add: bool = True) -> int:
        """Id of a special token; appended to the vocabulary when missing and ``allow_add``."""
        found = self._piece_to_id(piece)
        if found is not None:
            return found
        if piece in self.added_tokens:
            return self.added_tokens[piece]
        if not allow_add:
            raise TokenizerError(
                f"special token {piece!r} is not in the vocabulary of {self.path}; "
                "use a template made for this tokenizer or allow appending special tokens"
            )
        self.added_tokens[piece] = self.vocab_size
        return self.added_tokens[piece]

    def info(self) -> TokenizerInfo:
        return TokenizerInfo(
            type=self.type_name,
            path=os.path.abspath(self.path),
            base_vocab_size=self.base_vocab_size,
            vocab_size=self.vocab_size,
            sha256=self.sha256,
            added_tokens=dict(self.added_tokens),
        )


class SentencePieceTokenizer(DialogTokenizer):
    """A SentencePiece ``.model`` file (Llama 2 style: ``<s>`` = bos, ``</s>`` = eos)."""

    type_name = "sentencepiece"

    def __init__(self, model_path: str) -> None:
        import sentencepiece

        if not os.path.isfile(model_path):
            raise TokenizerError(
                f"--tokenizer-model {model_path}: no such file; pass the path of a SentencePiece "
                ".model file"
            )
        processor = sentencepiece.SentencePieceProcessor()
        try:
            processor.Load(model_path)
        except (OSError, RuntimeError) as exc:
            raise TokenizerError(
                f"--tokenizer-model {model_path}: not a SentencePiece model ({exc})"
            ) from None
        self._sp = processor
        super().__init__(model_path, processor.GetPieceSize(), file_sha256(model_path))
        self.bos_id = processor.bos_id() if processor.bos_id() >= 0 else None
        self.eos_id = processor.eos_id() if processor.eos_id() >= 0 else None
        self.unk_id = processor.unk_id() if processor.unk_id() >= 0 else None

    def _encode(self, text: str) -> List[int]:
        return self._sp.EncodeAsIds(text)

    def _special_ids(self) -> Set[int]:
        return {i for i in range(self.base_vocab_size) if self._sp.IsControl(i)}

    def _decode(self, ids: Sequence[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])

    def _id_to_piece(self, token: int) -> str:
        if token >= self.base_vocab_size:
            return f"<id {token}>"
        return self._sp.IdToPiece(token)

    def _piece_to_id(self, piece: str) -> Optional[int]:
        token = self._sp.PieceToId(piece)
        # PieceToId answers unk for unknown pieces; only a real match counts.
        if token == self._sp.unk_id() and piece != self._sp.IdToPiece(token):
            return None
        return token


_PARALLELISM = "TOKENIZERS_PARALLELISM"
_DOCUMENT_PROBE = "Plain text, as a document starts."
# texts on which BackendEncoder must give the ids of transformers' encode: spaces, newlines,
# special-token text (split as text), byte-level and multi-byte characters
_PROBE_TEXTS = ("Hello, world!", " leading and trailing ", "two\n\nlines\tand a tab",
                "<|im_end|> <s></s> [INST] <|endoftext|>", "ünï cödé 中文 😀", "  ", "\n")


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Hugging Face ``tokenizers`` batch calls made inside run on the calling thread (it reads
    TOKENIZERS_PARALLELISM at each call): preprocessing's parallelism is its worker processes,
    one tokenizing thread each, and a 1-worker run uses one core."""
    previous = os.environ.get(_PARALLELISM)
    os.environ[_PARALLELISM] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(_PARALLELISM, None)
        else:
            os.environ[_PARALLELISM] = previous


class BackendEncoder:
    """``HuggingFaceTokenizer.encode`` done by the ``tokenizers`` back-end alone, for many texts
    in one call: the ids of ``encode(text, add_special_tokens=False, split_special_tokens=True)``
    of a transformers fast tokenizer (whose ``encode`` is one ``encode_batch`` call of its
    back-end with special-token text split, no truncation, no padding), without the Python cost
    of each transformers call, without offsets (``encode_batch_fast``), on one thread.

    Picklable without transformers (the back-end travels as its JSON): tokenizer worker
    processes of a built-in template encode with it and never import transformers.
    ``matches_probe`` checks it against ids that transformers gave on probe texts."""

    batch_encoding = True

    def __init__(self, backend, probe_ids: List[List[int]]) -> None:
        self.backend = backend
        self.probe_ids = probe_ids

    @classmethod
    def of(cls, hf) -> Optional["BackendEncoder"]:
        """The encoder of ``hf`` (a transformers tokenizer), or None unless ``hf`` is a fast
        tokenizer that encodes through the unmodified transformers methods and the encoder gives
        its ids on the probe texts."""
        import tokenizers
        from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

        chain = ("encode", "encode_plus", "_encode_plus", "_batch_encode_plus",
                 "set_truncation_and_padding", "_get_padding_truncation_strategies")
        backend = getattr(hf, "_tokenizer", None)
        standard = all(getattr(type(hf), name, None) is getattr(PreTrainedTokenizerFast, name, None)
                       for name in chain)
        if not (standard and isinstance(hf, PreTrainedTokenizerFast)
                and isinstance(backend, tokenizers.Tokenizer)
                and PreTrainedTokenizerFast.encode is PreTrainedTokenizerBase.encode):
            return None
        encoder = cls(backend, [hf.encode(text, add_special_tokens=False,
                                          split_special_tokens=True) for text in _PROBE_TEXTS])
        return encoder if encoder.matches_probe() else None

    def matches_probe(self) -> bool:
        return self.encode_many(_PROBE_TEXTS) == self.probe_ids

    def encode(self, text: str) -> List[int]:
        return self.encode_many((text,))[0] if text else []

    def encode_many(self, texts: Sequence[str]) -> List[List[int]]:
        """Token ids of each text (``[]`` for an empty one). Raises what the back-end raises."""
        backend = self.backend
        if backend.truncation is not None:  # as transformers' encode does
            backend.no_truncation()
        if backend.padding is not None:
            backend.no_padding()
        if not backend.encode_special_tokens:
            backend.encode_special_tokens = True
        wanted = [text for text in texts if text]
        encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
        with _one_thread():
            encoded = iter(encode_batch(wanted, add_special_tokens=False))
        return [next(encoded).ids if text else [] for text in texts]


def _byte_alphabet() -> Dict[str, int]:
    """The 256 characters a byte-level BPE vocabulary (GPT-2's scheme, used by Llama 3, Qwen,
    ...) writes bytes with, and their bytes: each printable byte (33-126, 161-172, 174-255) as
    the character of the same code, every other byte, in order, as a character from U+0100 up."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in set(printable)]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


class ByteLevelSpans:
    """Token ids of a whole text, as ``hf(text, add_special_tokens=False)["input_ids"]`` gives
    them, and where each token starts in the text's UTF-8 bytes, for a byte-level BPE tokenizer,
    without the back-end's offsets (computing them costs ~40% of the encoding).

    Each token of a byte-level BPE stands for a fixed run of bytes (one per character of its
    vocabulary string; an added token for its text's bytes), so the byte offsets are the running
    sum of those lengths - exact when nothing rewrites the text first: no normalizer, no prefix
    space. ``of`` accepts a tokenizer only when so, and when the offsets agree with the
    back-end's on probe texts; every caller also checks that the lengths add up to the text's.
    """

    def __init__(self, backend, lengths: np.ndarray) -> None:
        self.backend = backend
        self.lengths = lengths  # [vocabulary] int64: UTF-8 bytes each id stands for

    @classmethod
    def of(cls, hf) -> Optional["ByteLevelSpans"]:
        """The spans of ``hf`` (a transformers fast tokenizer), or None when it is not a
        byte-level BPE whose token bytes can be summed (then use the back-end's offsets)."""
        import json

        backend = getattr(hf, "_tokenizer", None)
        if backend is None or BackendEncoder.of(hf) is None:  # standard encode methods only
            return None
        spec = json.loads(backend.to_str())
        pre = spec.get("pre_tokenizer") or {}
        steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
        byte_level = [p for p in steps if p.get("type") == "ByteLevel"]
        if (spec.get("normalizer") is not None or (spec.get("model") or {}).get("type") != "BPE"
                or not byte_level or any(p.get("add_prefix_space") for p in byte_level)):
            return None
        added = {token["id"]: token["content"] for token in spec.get("added_tokens", [])}
        alphabet = _byte_alphabet()
        vocab = backend.get_vocab(with_added_tokens=True)
        lengths = np.zeros(max(vocab.values()) + 1, dtype=np.int64)
        for token, index in vocab.items():
            if index in added:
                lengths[index] = len(added[index].encode("utf-8"))
            elif token and all(c in alphabet for c in token):
                lengths[index] = len(token)
            else:
                return None
        spans = cls(backend, lengths)
        return spans if spans._matches_probe(hf, alphabet, added) else None

    def _matches_probe(self, hf, alphabet: Dict[str, int], added: Dict[int, str]) -> bool:
        """On the probe texts: the ids are transformers' and the tokens' bytes, laid end to end
        from the computed starts, are the text's."""
        for text in _PROBE_TEXTS:
            ids = self.encode(text)
            starts = self.starts(ids, text)
            if ids != hf.encode(text, add_special_tokens=False) or starts is None:
                return False
            raw = text.encode("utf-8")
            for index, start in zip(ids, starts):
                piece = (added[index].encode("utf-8") if index in added else
                         bytes(alphabet[c] for c in self.backend.id_to_token(index)))
                if raw[start:start + len(piece)] != piece:
                    return False
        return True

    def encode(self, text: str) -> List[int]:
        """The ids of ``hf(text, add_special_tokens=False)``: special-token text becomes its
        token (no truncation, no padding), on one thread."""
        backend = self.backend
        if backend.truncation is not None:
            backend.no_truncation()
        if backend.padding is not None:
            backend.no_padding()
        split, backend.encode_special_tokens = backend.encode_special_tokens, False
        try:
            with _one_thread():
                return backend.encode_batch_fast([text], add_special_tokens=False)[0].ids
        finally:
            backend.encode_special_tokens = split

    def starts(self, ids: Sequence[int], text: str) -> Optional[np.ndarray]:
        """Byte offset in ``text``'s UTF-8 where each of its tokens ``ids`` starts; None when
        the lengths do not add up to the text's (then the offsets cannot be trusted)."""
        lengths = self.lengths[np.asarray(ids, dtype=np.int64)]
        ends = np.cumsum(lengths)
        total = len(text) if text.isascii() else len(text.encode("utf-8"))
        if (int(ends[-1]) if len(ends) else 0) != total:
            return None
        return ends - lengths


TOKENIZER_FILE_NAMES = ("special_tokens_map.json", "added_tokens.json", "merges.txt",
                        "chat_template.jinja", "chat_template.json")


def tokenizer_files(folder: str) -> List[str]:
    """Names of the tokenizer's files in a Hugging Face folder (not the model's: config.json and
    weights are left out, so the tokenizer's identity survives a model re-save)."""
    names = []
    for name in sorted(os.listdir(folder)):
        if not os.path.isfile(os.path.join(folder, name)):
            continue
        if (name.startswith(("tokenizer", "vocab.")) or name.endswith(".model")
                or name in TOKENIZER_FILE_NAMES):
            names.append(name)
    return names


def folder_sha256(folder: str) -> str:
    """Hex SHA-256 identity of a Hugging Face tokenizer folder: over the names and contents of
    its tokenizer files (``tokenizer_files``), so a re-saved model keeps its tokenizer's identity."""
    digest = hashlib.sha256()
    for name in tokenizer_files(folder):
        digest.update(name.encode() + file_sha256(os.path.join(folder, name)).encode())
    return digest.hexdigest()


class HuggingFaceTokenizer(DialogTokenizer):
    """A Hugging Face tokenizer folder (``tokenizer.json`` / ``tokenizer_config.json``)."""

    type_name = "huggingface"

    def __init__(self, path: str) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise TokenizerError(
                "--tokenizer-type huggingface needs transformers: pip install -e '.[hf]'"
            ) from None
        if not os.path.isdir(path):
            raise TokenizerError(f"--tokenizer-path {path}: not a folder with a tokenizer")
        try:
            self.hf = AutoTokenizer.from_pretrained(path, local_files_only=True,
                                                    trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise TokenizerError(f"--tokenizer-path {path}: cannot load tokenizer ({exc})") from None
        super().__init__(path, len(self.hf), folder_sha256(path))
        self.bos_id = self.hf.bos_token_id
        self.eos_id = self.hf.eos_token_id
        self.unk_id = self.hf.unk_token_id
        self.backend_encoder: Optional[BackendEncoder] = BackendEncoder.of(self.hf)
        """Encodes as ``encode`` does, many texts at once (None: not a transformers fast
        tokenizer with the standard encode methods; ``encode`` then calls transformers)."""

    @property
    def batch_encoding(self) -> bool:
        return self.backend_encoder is not None

    def encode_many(self, texts: Sequence[str]) -> List[List[int]]:
        if self.backend_encoder is None:
            return super().encode_many(texts)
        return self.backend_encoder.encode_many(texts)

    def document_prefix(self) -> List[int]:
        """The ids ``tokenizer(text)`` (``add_special_tokens=True``) puts before the text's own:
        Llama 2 / 3 their BOS, Qwen and GPT-2 nothing (found on a probe text)."""
        plain = self.hf.encode(_DOCUMENT_PROBE, add_special_tokens=False)
        full = self.hf.encode(_DOCUMENT_PROBE, add_special_tokens=True)
        for start in range(len(full) - len(plain) + 1):
            if full[start:start + len(plain)] == plain:
                return list(full[:start])
        wants_bos = getattr(self.hf, "add_bos_token", False) and self.bos_id is not None
        return [self.bos_id] if wants_bos else []

    def _special_ids(self) -> Set[int]:
        added = self.hf.added_tokens_decoder
        return set(self.hf.all_special_ids) | {i for i, t in added.items() if t.special}

    def _encode(self, text: str) -> List[int]:
        if self.backend_encoder is not None:  # the same ids, without transformers' call cost
            return self.backend_encoder.encode(text)
        # split_special_tokens: text that looks like "<|im_end|>" stays text, never a control id
        return self.hf.encode(text, add_special_tokens=False, split_special_tokens=True)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def _id_to_piece(self, token: int) -> str:
        return self.hf.convert_ids_to_tokens(token)

    def _piece_to_id(self, piece: str) -> Optional[int]:
        token = self.hf.convert_tokens_to_ids(piece)
        if token is None or (token == self.hf.unk_token_id and piece != self.hf.unk_token):
            return None
        return token

    @property
    def chat_template(self) -> Optional[str]:
        return getattr(self.hf, "chat_template", None)


def load_tokenizer(tokenizer_type: str, path: str) -> DialogTokenizer:
    """Load ``sentencepiece`` (``path`` = .model file) or ``huggingface`` (``path`` = folder)."""
    if tokenizer_type == "sentencepiece":
        return SentencePieceTokenizer(path)
    if tokenizer_type == "huggingface":
        return HuggingFaceTokenizer(path)
    raise TokenizerError(
        f"--tokenizer-type {tokenizer_type!r} is not supported; use sentencepiece or huggingface"
    )


def tokenizer_from_metadata(metadata: Dict) -> Optional[DialogTokenizer]:
    """The tokenizer a dataset (or a run) recorded in ``metadata["tokenizer"]`` (``type``,
    ``path``, ``added_tokens``: ``TokenizerInfo``), loaded from where it was, with the special
    tokens the template appended; None when it cannot be loaded there (moved or deleted)."""
    info = metadata["tokenizer"]
    try:
        tokenizer = load_tokenizer(info["type"], info["path"])
    except (TokenizerError, OSError):
        return None
    tokenizer.added_tokens = dict(info.get("added_tokens", {}))
    return tokenizer
