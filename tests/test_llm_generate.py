"""LLM generation: cached decode vs teacher forcing, batching, one `while` in the HLO, buckets, streaming,
min-length masking modes, and the golden e2e LLM tokens (fixtures `<v>/llm/decode.npz`, `<v>/e2e/`)."""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert.registry import convert_component
from cosyjax.config import ModelConfig
from cosyjax.llm import generate as G
from cosyjax.llm.config import LLMConfig
from cosyjax.llm.speech_lm import SpeechLM, backbone_forward

from .conftest import GOLDEN, model_dir


@functools.lru_cache(maxsize=None)
def _model(version):
    mc = ModelConfig.from_dir(model_dir(version))
    return convert_component("llm", mc), LLMConfig.from_model_config(mc)


def _decode_inputs(version):
    z = np.load(os.path.join(GOLDEN, version, "llm", "decode.npz"))
    return {k: z[k] for k in z.files}


def _apply(cfg, params, method, *args):
    return SpeechLM(cfg).apply({"params": params}, *args, method=method)


@pytest.mark.parametrize("version", ["cosyvoice2", "cosyvoice3"])
def test_cached_decode_equals_teacher_forced_forward(version):
    params, cfg = _model(version)
    z = _decode_inputs(version)
    steps = 24
    g = G.generate_detailed(params, cfg, z["text"], prompt_text=z["prompt_text"],
                            prompt_speech_token=z["prompt_speech_token"], sampling="greedy", max_len=steps,
                            record_full_steps=steps)
    n_tok = int(g.lengths[0])
    assert n_tok == steps
    toks = np.asarray(g.tokens[0, :n_tok])
    # teacher-forced: the unpadded prompt followed by the generated tokens, no cache reuse
    p = G.prepare(cfg, z["text"], prompt_text=z["prompt_text"], prompt_speech_token=z["prompt_speech_token"],
                  sampling="greedy")
    n = int(p.ids.shape[1] - p.start[0])
    prompt = _apply(cfg, params, SpeechLM.embed_prompt, jnp.asarray(p.ids[:, -n:]), jnp.asarray(p.kind[:, -n:]))
    speech = _apply(cfg, params, SpeechLM.embed_speech, jnp.asarray(toks[None, :-1]))
    _, logits = backbone_forward(params, cfg, jnp.concatenate([prompt, speech], axis=1))
    tf = np.asarray(jax.nn.log_softmax(logits[0, n - 1:], axis=-1))
    cached = np.asarray(g.logp_full[0, :steps])
    assert tf.shape == cached.shape
    assert np.max(np.abs(tf - cached)) <= 1e-5


def _three_rows(version):
    """Three rows whose text / prompt text / prompt speech lengths all differ (each fits a 16-slot prompt)."""
    z = _decode_inputs(version)
    text, pt, ps = z["text"][0], z["prompt_text"][0], z["prompt_speech_token"][0]
    rows = [(text[:4], pt[:4], ps[:6]), (text[:2], pt[:3], ps[:0]), (text[:3], pt[:0], ps[:5])]
    if version == "cosyvoice3":  # every row needs <|endofprompt|> in text or prompt text
        eop = 151646
        rows = [(t, p, s) if eop in p else (np.concatenate([[eop], t]), p, s) for t, p, s in rows]
    return rows


def _pad(rows, i):
    width = max(max(len(r[i]) for r in rows), 1)
    out = np.zeros((len(rows), width), np.int32)
    for b, r in enumerate(rows):
        out[b, : len(r[i])] = r[i]
    return out, np.array([len(r[i]) for r in rows], np.int32)


@pytest.mark.parametrize("version", ["cosyvoice2", "cosyvoice3"])
def test_batch_rows_equal_single_runs(version):
    params, cfg = _model(version)
    rows = _three_rows(version)
    (t, tl), (pt, ptl), (ps, psl) = _pad(rows, 0), _pad(rows, 1), _pad(rows, 2)
    keys = jax.random.split(jax.random.PRNGKey(7), 3)
    max_len = np.array([40, 37, 33])  # per-row limits; the batch and the single runs share buckets
    tokens, lengths = G.generate(params, cfg, t, tl, pt, ptl, ps, psl, key=keys, sampling="ras", max_len=max_len)
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    assert np.all(lengths > 0)
    for b, (tb, pb, sb) in enumerate(rows):
        single, n = G.generate(params, cfg, tb[None], prompt_text=pb[None], prompt_speech_token=sb[None],
                               key=keys[b:b + 1], sampling="ras", max_len=max_len[b])
        n = int(n[0])
        assert n == lengths[b], (b, n, lengths[b])
        np.testing.assert_array_equal(np.asarray(single[0, :n]), tokens[b, :n])
        assert np.all(tokens[b, n:] == -1)
    if version == "cosyvoice2":  # streaming gives the same tokens, chunk by chunk
        got = [[] for _ in rows]
        for chunk in G.generate_stream(params, cfg, t, tl, pt, ptl, ps, psl, key=keys, sampling="ras",
                                       max_len=max_len, hop=7):
            assert len(chunk) == 3 and all(len(c) <= 7 for c in chunk)
            for b, c in enumerate(chunk):
                got[b].extend(c.tolist())
        for b in range(3):
            assert got[b] == tokens[b, : lengths[b]].tolist()


def test_generate_is_one_while_loop_and_buckets_do_not_recompile():
    params, cfg = _model("cosyvoice2")
    z = _decode_inputs("cosyvoice2")
    p = G.prepare(cfg, z["text"], prompt_text=z["prompt_text"], prompt_speech_token=z["prompt_speech_token"],
                  key=jax.random.PRNGKey(0))
    args = (params, jnp.asarray(p.ids), jnp.asarray(p.kind), jnp.asarray(p.start), jnp.asarray(p.min_len),
            jnp.asarray(p.max_len), p.draws)
    hlo = G._generate_program.lower(*args, cfg=cfg, method="ras", max_new=p.max_new, capacity=p.capacity).as_text()
    assert hlo.count("stablehlo.while") == 1
    # same bucket (prompt 21 -> 32 slots, max_len 80 -> 128): a shorter prompt and text reuse the program
    key = jax.random.PRNGKey(1)
    G.generate(params, cfg, z["text"], prompt_text=z["prompt_text"], prompt_speech_token=z["prompt_speech_token"],
               key=key)
    size = G._generate_program._cache_size()
    G.generate(params, cfg, z["text"][:, :3], prompt_text=z["prompt_text"][:, :4],
               prompt_speech_token=z["prompt_speech_token"][:, :7], key=key)
    G.generate(params, cfg, z["text"][:, :4], prompt_text=z["prompt_text"][:, :2],
               prompt_speech_token=z["prompt_speech_token"][:, :12].repeat(2, axis=1)[:, :18], key=key)
    assert G._generate_program._cache_size() == size


def test_one_decode_loop_in_the_package():
    """generate, streaming, bistream and the server slots share one `while_loop` (cosyjax/llm/decode.py)."""
    pkg = os.path.dirname(G.__file__)
    hits = [(f, line) for f in sorted(os.listdir(pkg)) if f.endswith(".py")
            for line in open(os.path.join(pkg, f)).read().splitlines() if "while_loop" in line]
    assert len(hits) == 1 and hits[0][0] == "decode.py", hits


def test_min_len_masking_modes():
    """Upstream masks only id 6561 before min_len; another stop id (6562) still ends decoding.
    'stop_set' masks every stop id. (cosyvoice2 head bias steered to make a stop id the argmax.)"""
    params, cfg = _model("cosyvoice2")
    z = _decode_inputs("cosyvoice2")
    args = (z["text"],)
    kw = dict(prompt_text=z["prompt_text"], prompt_speech_token=z["prompt_speech_token"], sampling="greedy")

    def with_bias(idx):
        b = np.array(params["llm_decoder"]["bias"])
        b[idx] = 1e3
        return {**params, "llm_decoder": {**params["llm_decoder"], "bias": jnp.asarray(b)}}

    # eos 6561 dominant: masked for the first min_len steps, then decoding stops
    _, n = G.generate(with_bias(6561), cfg, *args, **kw, min_len=5)
    assert int(n[0]) == 5
    # 6562 dominant: upstream does not mask it -> stops at once; 'stop_set' holds it off for min_len steps
    _, n = G.generate(with_bias(6562), cfg, *args, **kw, min_len=5)
    assert int(n[0]) == 0
    _, n = G.generate(with_bias(6562), cfg.replace(min_len_mask="stop_set"), *args, **kw, min_len=5)
    assert int(n[0]) == 5
    # per-row stop in a batch: each row ends on eos right after its own min_len
    rows = _three_rows("cosyvoice2")
    (t, tl), (pt, ptl), (ps, psl) = _pad(rows, 0), _pad(rows, 1), _pad(rows, 2)
    toks, n = G.generate(with_bias(6561), cfg, t, tl, pt, ptl, ps, psl, sampling="greedy", min_len=[3, 7, 5])
    assert np.asarray(n).tolist() == [3, 7, 5]
    assert np.all(np.asarray(toks)[0, 3:] == -1) and np.all(np.asarray(toks)[1, :7] >= 0)


@pytest.mark.parametrize("version", ["cosyvoice2", "cosyvoice3"])
def test_golden_e2e_llm_tokens(version):
    """The e2e run's 200 greedy tokens (min_len 20, max_len 200) and their top-32 log-probs."""
    params, cfg = _model(version)
    inp = np.load(os.path.join(GOLDEN, version, "e2e", "inputs.npz"))
    ref = np.load(os.path.join(GOLDEN, version, "e2e", "nonstream.npz"))
    g = G.generate_detailed(params, cfg, inp["text"], prompt_text=inp["prompt_text"],
                            prompt_speech_token=inp["llm_prompt_speech_token"], embedding=inp["llm_embedding"],
                            sampling="greedy", record_topk=32)
    n = int(g.lengths[0])
    np.testing.assert_array_equal(np.asarray(g.tokens[0, :n]), ref["llm_tokens"])
    vals = np.asarray(g.logp_topk_values[0, : ref["llm_logp_top32_values"].shape[0]])
    assert np.max(np.abs(vals - ref["llm_logp_top32_values"])) < 1e-4


def test_bfloat16_backbone_close_to_float32():
    """bf16 weights/activations (f32 norms, softmax, RoPE tables and logits) stay close to f32."""
    from cosyjax.llm.speech_lm import cast_params

    params, cfg = _model("cosyvoice2")
    z = np.load(os.path.join(GOLDEN, "cosyvoice2", "llm", "backbone.npz"))
    xs = jnp.asarray(z["xs"])
    _, ref = backbone_forward(params, cfg, xs)
    cfg16 = cfg.replace(dtype="bfloat16")
    h16, got = backbone_forward(cast_params(params, "bfloat16"), cfg16, xs)
    assert h16.dtype == jnp.bfloat16 and got.dtype == jnp.float32
    rel = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
    assert rel < 3e-2, rel


def test_forced_tokens_replay_golden_and_generate_traced_under_vmap():
    """`forced_tokens` reproduces the CV3 forced-silence golden run (token 1 at steps 40..47); a forced stop
    id ends the row; `generate_traced` inside jit(vmap) gives `generate`'s tokens."""
    params, cfg = _model("cosyvoice3")
    inp = np.load(os.path.join(GOLDEN, "cosyvoice3", "e2e", "inputs.npz"))
    ref = np.load(os.path.join(GOLDEN, "cosyvoice3", "e2e", "nonstream_forced_silence.npz"))
    kw = dict(prompt_text=inp["prompt_text"], prompt_speech_token=inp["llm_prompt_speech_token"], sampling="greedy")
    g = G.generate_detailed(params, cfg, inp["text"], **kw, record_topk=32,
                            forced_tokens={s: 1 for s in range(40, 48)})
    n = int(g.lengths[0])
    np.testing.assert_array_equal(np.asarray(g.tokens[0, :n]), ref["llm_tokens"])
    vals = np.asarray(g.logp_topk_values[0, : ref["llm_logp_top32_values"].shape[0]])
    assert np.max(np.abs(vals - ref["llm_logp_top32_values"])) < 1e-4
    # the array form, forcing the eos id at step 7 (past min_len): the row ends there
    forced = np.full(8, -1)
    forced[7] = cfg.stop_ids[0]
    g = G.generate_detailed(params, cfg, inp["text"], **kw, min_len=2, max_len=30, forced_tokens=forced)
    assert int(g.lengths[0]) == 7
    with pytest.raises(G.LLMInputError, match="forced_tokens"):
        G.generate_detailed(params, cfg, inp["text"], **kw, forced_tokens={3: cfg.speech_vocab_size})
    # the traceable core, vmapped over two rows (each a batch of one) inside jit
    p = G.prepare(cfg, inp["text"], None, inp["prompt_text"], None, inp["llm_prompt_speech_token"], None,
                  sampling="greedy", max_len=30)
    rows = [jnp.stack([jnp.asarray(a)] * 2) for a in (p.ids, p.kind, p.start, p.min_len, p.max_len, p.draws)]
    run = jax.jit(jax.vmap(functools.partial(G.generate_traced, params, cfg, method="greedy", max_new=p.max_new,
                                             capacity=p.capacity)))
    out, lengths = run(*rows)
    want, want_n = G.generate(params, cfg, inp["text"], **kw, max_len=30)
    np.testing.assert_array_equal(out[:, 0], jnp.concatenate([want, want]))
    np.testing.assert_array_equal(lengths[:, 0], jnp.concatenate([want_n, want_n]))


def test_fused_qkv_and_bf16_kv_cache():
    """`fuse_qkv` gives `abstract_params(fused cfg)`'s tree and the same logits / greedy tokens; a bf16 KV
    cache (f32 compute) stays close to f32."""
    from cosyjax.llm.speech_lm import abstract_params, fuse_qkv, new_cache

    params, cfg = _model("cosyvoice2")
    fcfg = cfg.replace(fused_qkv=True)
    fused = fuse_qkv(params)
    shapes = lambda t: jax.tree_util.tree_map(lambda a: tuple(a.shape), t)  # noqa: E731
    assert shapes(fused) == shapes(abstract_params(fcfg))
    z = np.load(os.path.join(GOLDEN, "cosyvoice2", "llm", "backbone.npz"))
    xs = jnp.asarray(z["xs"])
    _, ref = backbone_forward(params, cfg, xs)
    _, got = backbone_forward(fused, fcfg, xs)
    assert float(jnp.max(jnp.abs(got - ref))) < 1e-5
    zd = _decode_inputs("cosyvoice2")
    kw = dict(prompt_text=zd["prompt_text"], prompt_speech_token=zd["prompt_speech_token"], sampling="greedy",
              max_len=24)
    want, n = G.generate(params, cfg, zd["text"], **kw)
    got_t, n2 = G.generate(fused, fcfg, zd["text"], **kw)
    np.testing.assert_array_equal(np.asarray(got_t)[0, : int(n[0])], np.asarray(want)[0, : int(n[0])])
    bcfg = cfg.replace(kv_cache_dtype="bfloat16")
    assert new_cache(bcfg, 1, 8).k[0].dtype == jnp.bfloat16
    same = np.asarray(want)[0, :8]  # both runs feed the same tokens, so the log-probs are comparable
    g32 = G.generate_detailed(params, cfg, zd["text"], **kw, record_full_steps=8, forced_tokens=same)
    g16 = G.generate_detailed(params, bcfg, zd["text"], **kw, record_full_steps=8, forced_tokens=same)
    rel = float(jnp.linalg.norm(g16.logp_full - g32.logp_full) / jnp.linalg.norm(g32.logp_full))
    assert rel < 1e-2, rel


def test_loop_program_updates_the_cache_in_place():
    """The donated loop program (streaming, slots, bistream) writes the KV cache with in-place updates:
    no copy of a cache-shaped buffer in the compiled HLO, and the cache is aliased input -> output."""
    import re

    from cosyjax.llm.decode import loop_program

    params, cfg = _model("cosyvoice2")
    p = G.prepare(cfg, np.array([[5, 6, 7], [8, 9, 10]]), key=jax.random.PRNGKey(0), max_len=40)
    st = G._prefill_program(params, *(jnp.asarray(a) for a in (p.ids, p.kind, p.start, p.min_len, p.max_len)),
                            p.draws, cfg=cfg, capacity=p.capacity, method=p.sampler, max_new=p.max_new)
    hlo = loop_program.lower(params, st, jnp.asarray(4, jnp.int32), cfg=cfg).compile().as_text()
    cache = "f32[%s]" % ",".join(map(str, st.cache.k[0].shape))
    copies = [ln for ln in hlo.splitlines() if re.search(re.escape(cache) + r"\{[^}]*\} copy\(", ln)]
    assert copies == []
    assert "input_output_alias" in hlo and hlo.count(" while(") == 1
