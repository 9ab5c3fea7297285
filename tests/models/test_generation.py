"""KV-cache decoding (`jpeft.models.llama.KVCache`, `jpeft.models.generation`) on a small random
Llama: cached prefill and decode steps equal the plain causal forward; padded batches (either
side) decode as each prompt alone; greedy equals recompute-everything greedy; stop tokens,
nucleus sampling, adapters run factored, and bad input. SmolLM2 against transformers' own
`generate` is in test_llama.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.models import generation
from jpeft.models.llama import KVCache, Llama, LlamaConfig, generate

C = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=6, num_kv_heads=2,
                tie_embeddings=False)
PARAMS = Llama(C).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]
# a sharper random model: larger embeddings make the argmax far from ties
PARAMS = {**PARAMS, "embed_tokens": {"embedding": 40 * PARAMS["embed_tokens"]["embedding"]}}
IDS = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (3, 9), 1, 97), np.int32)
APPLY = Llama(C).apply
FORWARD = jax.jit(APPLY)


def causal_logits(ids):
    """The plain forward of each row of `ids` on a right-padded buffer of 20 tokens (one compile:
    a causal model's logits at a position do not depend on later tokens)."""
    buf = np.zeros((len(ids), 20), np.int32)
    for row, seq in enumerate(ids):
        buf[row, :len(seq)] = seq
    out = FORWARD({"params": PARAMS}, buf)
    return [out[row, :len(seq)] for row, seq in enumerate(ids)]


def test_prefill_and_decode_steps_equal_the_causal_forward():
    full = FORWARD({"params": PARAMS}, IDS)
    logits, cache = FORWARD({"params": PARAMS}, IDS[:, :6], cache=KVCache.empty(C, 3, 12))
    np.testing.assert_allclose(logits, full[:, :6], atol=1e-5)
    for t in range(6, 9):
        step, cache = FORWARD({"params": PARAMS}, IDS[:, t:t + 1], cache=cache)
        np.testing.assert_allclose(step[:, 0], full[:, t], atol=1e-5)
    assert int(cache.index) == 9 and cache.positions.tolist() == [9, 9, 9]


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_prompts_see_only_their_real_tokens(side):
    lengths = [9, 4, 6]
    mask = np.zeros(IDS.shape, bool)
    ids = np.zeros_like(IDS)
    for row, n in enumerate(lengths):
        cols = slice(9 - n, 9) if side == "left" else slice(0, n)
        mask[row, cols], ids[row, cols] = True, IDS[row, :n]
    logits, cache = FORWARD({"params": PARAMS}, ids, cache=KVCache.empty(C, 3, 9), mask=mask)
    alone = causal_logits([IDS[row, :n] for row, n in enumerate(lengths)])
    for row in range(3):
        np.testing.assert_allclose(logits[row][mask[row]], alone[row], atol=1e-5)
    assert cache.positions.tolist() == lengths


def naive_greedy(prompts, n):
    """Recompute every whole sequence for every token (no cache)."""
    seqs = [list(p) for p in prompts]
    for _ in range(n):
        for seq, logits in zip(seqs, causal_logits(seqs)):
            seq.append(int(jnp.argmax(logits[-1])))
    return [seq[len(p):] for seq, p in zip(seqs, prompts)]


def test_batched_padded_greedy_equals_each_prompt_alone():
    prompts = [IDS[0, :9], IDS[1, :3], IDS[2, :6]]
    ids = np.zeros((3, 9), np.int32)
    mask = np.zeros((3, 9), bool)
    for row, p in enumerate(prompts):   # mixed: right-padded rows beside a full one
        ids[row, :len(p)], mask[row, :len(p)] = p, True
    out = generate(PARAMS, C, ids, mask, max_new_tokens=8)
    assert np.asarray(out.tokens).tolist() == naive_greedy(prompts, 8)
    assert out.lengths.tolist() == [8, 8, 8]


def test_stop_tokens_pad_the_rest_and_end_the_loop():
    free = np.asarray(generate(PARAMS, C, IDS, max_new_tokens=10).tokens)
    stop = int(free[0, 3])   # row 0 stops at its 4th token; the others where (if) they emit it
    out = generate(PARAMS, C, IDS, max_new_tokens=10, stop_tokens=[stop], pad_id=-1)
    for row in range(3):
        hits = np.flatnonzero(free[row] == stop)
        n = int(hits[0]) + 1 if hits.size else 10
        assert int(out.lengths[row]) == n
        np.testing.assert_array_equal(out.tokens[row, :n], free[row, :n])
        assert np.all(np.asarray(out.tokens[row, n:]) == -1)


def test_sampling_is_keyed_and_top_p_keeps_the_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = np.isfinite(np.asarray(generation.top_p_logits(logits, 0.7)))
    assert kept.tolist() == [[True, True, False, False]]    # 0.5 < 0.7 <= 0.5 + 0.3
    assert np.isfinite(np.asarray(generation.top_p_logits(logits, 0.01))).tolist() == [[True, False, False, False]]
    one = generate(PARAMS, C, IDS, max_new_tokens=6, temperature=1.0, key=jax.random.PRNGKey(5))
    two = generate(PARAMS, C, IDS, max_new_tokens=6, temperature=1.0, key=jax.random.PRNGKey(5))
    np.testing.assert_array_equal(one.tokens, two.tokens)
    hot = generate(PARAMS, C, IDS, max_new_tokens=6, temperature=50.0, key=jax.random.PRNGKey(6))
    greedy = generate(PARAMS, C, IDS, max_new_tokens=6)
    assert not np.array_equal(hot.tokens, greedy.tokens)
    nucleus = generate(PARAMS, C, IDS, max_new_tokens=6, temperature=50.0, top_p=1e-6, key=jax.random.PRNGKey(6))
    np.testing.assert_array_equal(nucleus.tokens, greedy.tokens)   # only the top token survives


def test_adapters_decode_factored_as_materialised():
    spec = jpeft.Spec({r"layers_\d/(self_attn/(q|v)_proj|mlp/down_proj)/kernel": jpeft.LoRA(rank=4, alpha=8)})
    tree = jpeft.init(jax.random.PRNGKey(2), PARAMS, spec)
    tree = jax.tree.map(lambda n: n.replace(train={**n.train, "b": 0.5 * jnp.ones_like(n.train["b"])})
                        if jpeft.is_adapter(n) else n, tree, is_leaf=jpeft.is_adapter)
    factored = generate(tree, C, IDS, max_new_tokens=6, apply_fn=jpeft.factored(APPLY, spec))
    merged = generate(jpeft.apply(tree, spec), C, IDS, max_new_tokens=6)
    np.testing.assert_array_equal(factored.tokens, merged.tokens)
    assert not np.array_equal(merged.tokens, generate(PARAMS, C, IDS, max_new_tokens=6).tokens)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="need 14 cache slots; the cache has 12 .*never truncated"):
        generate(PARAMS, C, IDS, max_new_tokens=5, slots=12)
    with pytest.raises(ValueError, match=r"sequences \[1\] have no real token"):
        generate(PARAMS, C, IDS, np.array([[1] * 9, [0] * 9, [1] * 9]), max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p and key apply to sampling only"):
        generate(PARAMS, C, IDS, max_new_tokens=2, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="needs key="):
        generate(PARAMS, C, IDS, max_new_tokens=2, temperature=0.7)
    with pytest.raises(ValueError, match="prompt_mask: expected shape"):
        generate(PARAMS, C, IDS, np.ones((3, 4)), max_new_tokens=2)
    with pytest.raises(ValueError, match="mask= pads the prompts of a cached call"):
        APPLY({"params": PARAMS}, IDS, mask=np.ones(IDS.shape))
