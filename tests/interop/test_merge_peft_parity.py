"""`jpeft.merge_adapters` against HF PEFT's `add_weighted_adapter` on the same adapters: a torch
model with an Embedding and two Linears, three LoRA adapters with randomised factors (different
alphas, and different ranks where the type allows), every combination type; the merged `ΔW` of
each layer within 1e-5. DARE runs on the Bernoulli masks PEFT itself drew (recorded as PEFT's
`random_pruning` runs, with PEFT's own code doing the pruning)."""

import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.merging import merge_adapters

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
merge_utils = pytest.importorskip("peft.utils.merge_utils")

NAMES = ("x", "y", "z")
ALPHAS = (8.0, 4.0, 12.0)
WEIGHTS = (0.7, -0.4, 1.3)
LAYERS = ("emb", "q", "v")   # PEFT visits the modules in this (definition) order
PATH = {"emb": "emb/embedding", "q": "q/kernel", "v": "v/kernel"}


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8)
        self.q = torch.nn.Linear(8, 12, bias=False)
        self.v = torch.nn.Linear(12, 6, bias=False)


def _np(t):
    return t.detach().numpy().astype(np.float32)


def build(ranks, rslora=False):
    """The PEFT model with adapters x, y, z (random factors) and the same three as jpeft trees."""
    torch.manual_seed(0)
    base = Tiny()
    model = None
    for name, r, alpha in zip(NAMES, ranks, ALPHAS):
        cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(LAYERS), use_rslora=rslora)
        if model is None:
            model = peft.get_peft_model(base, cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in LAYERS:
            mod = getattr(model.base_model.model, layer)
            for name in NAMES:
                if layer == "emb":
                    a, b = mod.lora_embedding_A[name], mod.lora_embedding_B[name]
                else:
                    a, b = mod.lora_A[name].weight, mod.lora_B[name].weight
                a.copy_(0.5 * torch.randn(a.shape, generator=gen))
                b.copy_(0.5 * torch.randn(b.shape, generator=gen))
    params = {"emb": {"embedding": jnp.asarray(_np(base.emb.weight))},
              "q": {"kernel": jnp.asarray(_np(base.q.weight).T)}, "v": {"kernel": jnp.asarray(_np(base.v.weight).T)}}
    trees, specs = [], []
    for name, r, alpha in zip(NAMES, ranks, ALPHAS):
        spec = jpeft.Spec({r"emb/embedding|q/kernel|v/kernel": jpeft.LoRA(rank=r, alpha=alpha, rslora=rslora)})
        tree = jpeft.init(jnp.zeros((2,), jnp.uint32), params, spec)
        for layer in LAYERS:
            mod = getattr(model.base_model.model, layer)
            if layer == "emb":
                a, b = mod.lora_embedding_A[name], mod.lora_embedding_B[name]
            else:
                a, b = mod.lora_A[name].weight, mod.lora_B[name].weight
            leaf, key = PATH[layer].split("/")
            node = tree[leaf][key]
            tree[leaf][key] = node.replace(train={"a": jnp.asarray(_np(a).T), "b": jnp.asarray(_np(b).T)})
        trees.append(tree)
        specs.append(spec)
    return model, trees, specs


def peft_delta(model, layer, name):
    """PEFT's ΔW of `layer` in jpeft's kernel layout `(in, out)` (embedding: `(vocab, dim)`)."""
    mod = getattr(model.base_model.model, layer)
    delta = _np(mod.get_delta_weight(name))
    return delta if layer == "emb" else delta.T


def jpeft_delta(merged, layer):
    leaf, key = PATH[layer].split("/")
    node = merged.params[leaf][key]
    return np.asarray(node.method.scale * (node.train["a"] @ node.train["b"]))


@pytest.fixture
def record_masks(monkeypatch):
    """Every Bernoulli keep-mask PEFT's `random_pruning` draws, in order (PEFT's own function
    still does the pruning: the generator state is restored before it runs)."""
    drawn = []
    original = merge_utils.random_pruning

    def recording(tensor, density, rescale):
        state = torch.get_rng_state()
        drawn.append(_np(torch.bernoulli(torch.full_like(input=tensor, fill_value=density))).astype(bool))
        torch.set_rng_state(state)
        return original(tensor, density, rescale)

    monkeypatch.setattr(merge_utils, "random_pruning", recording)
    return drawn


def jpeft_masks(drawn, svd_type):
    """PEFT's masks per layer (paper layout) as `merge_adapters(masks=...)` (kernel layout)."""
    masks, it = {}, iter(drawn)
    for layer in LAYERS:
        if svd_type:   # one mask per ΔW_i; PEFT's embedding ΔW is already (vocab, dim)
            masks[PATH[layer]] = {"delta": [m if layer == "emb" else m.T for m in (next(it) for _ in NAMES)]}
        else:          # the A stack, then the B stack
            a = [next(it).T for _ in NAMES]
            masks[PATH[layer]] = {"a": a, "b": [next(it).T for _ in NAMES]}
    assert next(it, None) is None
    return masks


EQUAL = (4, 4, 4)
MIXED = (4, 2, 3)
CASES = {  # id: (ranks, combination_type, options for both)
    "cat": (MIXED, "cat", {}),
    "linear": (EQUAL, "linear", {}),
    "ties": (EQUAL, "ties", {"density": 0.5}),
    "ties_frequency": (EQUAL, "ties", {"density": 0.4, "majority_sign_method": "frequency"}),
    "magnitude_prune": (EQUAL, "magnitude_prune", {"density": 0.3}),
    "svd": (MIXED, "svd", {}),
    "svd_rank2": (MIXED, "svd", {"svd_rank": 2}),
    "ties_svd": (EQUAL, "ties_svd", {"density": 0.5}),
    "magnitude_prune_svd": (MIXED, "magnitude_prune_svd", {"density": 0.6}),
    "dare_linear": (EQUAL, "dare_linear", {"density": 0.5}),
    "dare_ties": (EQUAL, "dare_ties", {"density": 0.7, "majority_sign_method": "frequency"}),
    "dare_linear_svd": (EQUAL, "dare_linear_svd", {"density": 0.5}),
    "dare_ties_svd": (MIXED, "dare_ties_svd", {"density": 0.6}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_add_weighted_adapter(case, record_masks):
    ranks, combination, options = CASES[case]
    model, trees, specs = build(ranks)
    torch.manual_seed(123)
    model.add_weighted_adapter(list(NAMES), list(WEIGHTS), "merged", combination_type=combination, **options)
    extra = {"masks": jpeft_masks(record_masks, combination.endswith("svd"))} if "dare" in combination else {}
    merged = merge_adapters(trees, specs, WEIGHTS, combination, **options, **extra)
    config = model.peft_config["merged"]
    node = merged.params["q"]["kernel"]
    assert (node.method.rank, node.method.scale) == (config.r, config.lora_alpha / config.r)
    for layer in LAYERS:
        np.testing.assert_allclose(jpeft_delta(merged, layer), peft_delta(model, layer, "merged"), atol=1e-5,
                                   err_msg=f"{case}: {layer}")
        assert np.abs(peft_delta(model, layer, "merged")).max() > 1e-2   # not trivially zero


def test_rslora_source_scale_is_one_and_peft_compat_inherits_it():
    """PEFT 0.21 copies `use_rslora` into the new adapter (scale √r instead of 1): the default
    gives the intended ΔW; `compat="peft"` reproduces PEFT's."""
    model, trees, specs = build(EQUAL, rslora=True)
    model.add_weighted_adapter(list(NAMES), list(WEIGHTS), "merged", combination_type="svd")
    intended = merge_adapters(trees, specs, WEIGHTS, "svd")
    compat = merge_adapters(trees, specs, WEIGHTS, "svd", compat="peft")
    assert intended.params["q"]["kernel"].method.scale == 1.0
    assert compat.params["q"]["kernel"].method.scale == pytest.approx(2.0)   # √4
    for layer in LAYERS:
        np.testing.assert_allclose(jpeft_delta(compat, layer), peft_delta(model, layer, "merged"), rtol=1e-5,
                                   atol=1e-5)
        np.testing.assert_allclose(2.0 * jpeft_delta(intended, layer), peft_delta(model, layer, "merged"),
                                   rtol=1e-5, atol=1e-5)
