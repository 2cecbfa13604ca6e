"""The encoder (tunesmith/embed/encoder.py) encodes as sentence_transformers.SentenceTransformer(folder).encode does:
tiny BERT folders with each pooling mode, a plain transformers folder, and (integration) the default model."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import build_tiny_encoder
from tunesmith.embed.encoder import DEFAULT_ENCODER, load_encoder, pool, read_spec, resolve_encoder_folder
from tunesmith.errors import UserError

TEXTS = ["What is the interest on a bank loan?", "the river bank in the north", "snow",
         "how does a boat cross the old bridge over the water in the south of the city where fish swim " * 3,
         "Which tree grows in the green forest on the mountain?", "rain, sun and a blue sky", "a"]


def reference(folder, texts=TEXTS):
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(folder), device="cpu")
    return model.encode(texts, convert_to_tensor=True, normalize_embeddings=True, batch_size=3)


@pytest.mark.parametrize("pooling", ["mean", "cls", "max", "mean_sqrt_len_tokens", "lasttoken", ("cls", "mean")])
def test_tiny_encoder_equals_sentence_transformers(tmp_path, pooling):
    folder = build_tiny_encoder(tmp_path / "enc", pooling=pooling, normalize=pooling != "max")
    encoder = load_encoder(str(folder))
    ours = encoder.encode(TEXTS, batch_size=2)
    assert ours.dtype == torch.float32 and ours.shape == (len(TEXTS), 32 * (2 if isinstance(pooling, tuple) else 1))
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-6)
    assert (ours - reference(folder)).abs().max() <= 1e-5
    assert encoder.max_seq_length == 24  # the long text is cut as sentence-transformers cuts it


def test_plain_transformers_folder_is_mean_pooled(tmp_path):
    folder = build_tiny_encoder(tmp_path / "plain", sentence_transformers=False)
    encoder = load_encoder(str(folder))
    assert encoder.spec.pooling == ("mean",) and not encoder.spec.normalize
    assert (encoder.encode(TEXTS) - reference(folder)).abs().max() <= 1e-5


def test_batching_and_order_do_not_change_vectors(tmp_path):
    encoder = load_encoder(str(build_tiny_encoder(tmp_path / "enc")))
    whole = encoder.encode(TEXTS, batch_size=64)
    assert (encoder.encode(TEXTS, batch_size=1) - whole).abs().max() <= 1e-5
    assert torch.allclose(encoder.encode(TEXTS[::-1], batch_size=3), whole.flip(0), atol=1e-5)
    assert encoder.encode([]).shape == (0, 32)


def test_forward_keeps_gradients(tmp_path):
    encoder = load_encoder(str(build_tiny_encoder(tmp_path / "enc")))
    vectors = encoder(encoder.tokenize(TEXTS[:3]))
    vectors.sum().backward()
    assert encoder.model.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_pool_formulas_by_hand():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])  # the last position is padding
    mask = torch.tensor([[1, 1, 0]])
    assert pool(hidden, mask, ("mean",)).tolist() == [[2.0, 3.0]]
    assert pool(hidden, mask, ("max",)).tolist() == [[3.0, 4.0]]
    assert pool(hidden, mask, ("cls",)).tolist() == [[1.0, 2.0]]
    assert pool(hidden, mask, ("lasttoken",)).tolist() == [[3.0, 4.0]]
    assert torch.allclose(pool(hidden, mask, ("mean_sqrt_len_tokens",)), torch.tensor([[4.0, 6.0]]) / 2 ** 0.5)


def test_unsupported_folders_are_user_errors(tmp_path):
    folder = build_tiny_encoder(tmp_path / "enc")
    modules = json.loads((folder / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(UserError, match="module 3: type 'sentence_transformers.models.Dense' is not supported"):
        read_spec(folder)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "weightedmean"}))
    modules.pop()
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(UserError, match="pooling mode 'weightedmean' is not supported"):
        read_spec(folder)
    with pytest.raises(UserError, match="neither a built-in encoder"):
        resolve_encoder_folder(str(tmp_path / "missing"))


def test_default_encoder_is_found_in_its_package():
    folder = resolve_encoder_folder(DEFAULT_ENCODER)
    spec = read_spec(folder)
    assert spec.pooling == ("mean",) and spec.normalize and spec.max_seq_length == 256


@pytest.mark.integration
def test_default_encoder_equals_sentence_transformers():
    encoder = load_encoder()
    ours = encoder.encode(TEXTS, batch_size=3)
    assert ours.shape == (len(TEXTS), 384)
    assert (ours - reference(resolve_encoder_folder(DEFAULT_ENCODER))).abs().max() <= 1e-5
