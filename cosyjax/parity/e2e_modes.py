"""Every inference mode end to end: upstream `CosyVoice{2,3}Model.tts(**model_input, stream, speed)` per case of
`<v>/e2e_modes/meta.json["cases"]` vs the public path (tests/golden/README.md "Every inference mode end to end").

Per case `{name, mode, inputs, stream, speed, text_generator}`:
1. the mode's `Frontend.frontend_<mode>` builds the model input from the case's arrays (prompt tokens, mel and
   embedding as a `Prompt`, the recorded text ids through a tokenizer that maps placeholders to them: the
   golden ids are random draws, not the tokenisation of any text); row `model_input` checks that the
   builder keeps exactly the keys and values of `inputs_<mode>.npz` (upstream's `frontend_<mode>`).
   vc is the exception: `frontend_vc` tokenises audio, so the recorded arrays are the model input.
2. the LLM part of the mode, replayed as the e2e checker does: greedy `Engine.llm_generation` (tokens exact,
   top-32 log-probs, the prompt embedding `lm_input`); vc has none; bistream runs the public
   `cosyjax.llm.bistream.generate_bistream` over the frontend's id generator, cut where the reference forced
   eos (decoded step `spec.bistream_stop`, fill steps included: a decode segment that ends before the next
   text id is pulled ended on a fill).
3. `Engine.tts(mi, stream=, speed=, key=, records=, tokens=, noise_provider=)` with those tokens (vc: the
   source tokens of the model input) and the recorded HiFT noise: schedule, every chunk's audio, tts_speech.
   The mel rows run the flow on the engine's flow tokens with each call's arguments (`e2e.replay_rows`).
Rows `e2e_modes <case> <output>` with the e2e tolerances (mel 1e-4, audio 1e-3, tokens exact).
"""
from __future__ import annotations

import numpy as np

from cosyjax.parity import e2e
from cosyjax.parity.core import FixtureContext, Listing, Result, compare, exact, failure

FOLDER = "e2e_modes"
COMPONENT = "e2e_modes"
UNUSED = {"*": dict(e2e.UNUSED["*"])}
for _case in ("bistream_nonstream.npz", "bistream_stream.npz"):
    UNUSED[_case] = {"lm_input": "bistream builds its prompt incrementally (text/speech interleave); the exact "
                                 "llm_tokens row covers it",
                     "llm_logp_top32_values": "generate_bistream records no log-probs; the exact llm_tokens row "
                                              "covers the decode"}
_PLACEHOLDERS = {"text": "<text>", "prompt_text": "<prompt_text>"}


class _RecordedIds:
    """Tokenizer stand-in: `encode('<text>')` -> the case's recorded text ids (see the module doc)."""

    def __init__(self, arrays: dict, endofprompt_id):
        self._ids = {ph: [int(t) for t in np.asarray(arrays[k]).reshape(-1)]
                     for k, ph in _PLACEHOLDERS.items() if k in arrays}
        self._ids[""] = []  # cross_lingual tokenises an empty prompt text
        self.endofprompt_id = endofprompt_id

    def encode(self, text: str, **unused) -> list[int]:
        return list(self._ids[text])


def _cases(ctx: FixtureContext) -> list[dict]:
    cases = ctx.json(FOLDER, "meta.json")["cases"]
    return [c for c in cases if ctx.cases is None or c["name"] in ctx.cases or c["name"][:-4] in ctx.cases]


def selected_files(ctx: FixtureContext, lst: Listing) -> Listing:
    """With `--cases`, only the selected cases' files must be read (the rest are still checked for presence)."""
    if ctx.cases is None:
        return lst
    keep = {"cv3_hift_fixed_noise.npz"}
    for c in _cases(ctx):
        keep |= {c["name"], c["inputs"]}
    return Listing(lst.folder, {k: v for k, v in lst.files.items() if k in keep})


def build_model_input(engine, mode: str, arrays: dict, text_generator: bool) -> tuple[dict, str]:
    """The mode's frontend builder on the case's arrays -> (model_input, how it was built)."""
    from cosyjax.frontend.model_inputs import Frontend
    from cosyjax.frontend.prompt import Prompt
    from cosyjax.frontend.speakers import SpeakerStore

    version = engine.config.version
    if mode == "vc":
        return {k: arrays[k] for k in arrays}, "recorded arrays (frontend_vc tokenises the source audio)"
    spk = SpeakerStore({"spk": {"embedding": arrays["flow_embedding"]}}) if mode == "sft" else None
    fe = Frontend(version, tokenizer=_RecordedIds(arrays, engine.config.llm.endofprompt_id), spk2info=spk)
    text = (p for p in [_PLACEHOLDERS["text"]]) if text_generator else _PLACEHOLDERS["text"]
    if mode == "sft":
        return fe.frontend_sft(text, "spk"), "frontend_sft"
    tokens = arrays.get("llm_prompt_speech_token", arrays.get("flow_prompt_speech_token"))
    emb = arrays.get("llm_embedding", arrays["flow_embedding"])
    prompt = Prompt(speech_token=tokens, speech_feat=arrays["prompt_speech_feat"], embedding=emb)
    if mode in ("zero_shot", "zero_shot_speed", "bistream"):
        return fe.frontend_zero_shot(text, _PLACEHOLDERS["prompt_text"], prompt), "frontend_zero_shot"
    if mode == "cross_lingual":
        return fe.frontend_cross_lingual(text, prompt), "frontend_cross_lingual"
    if mode == "instruct2":
        return fe.frontend_instruct2(text, _PLACEHOLDERS["prompt_text"], prompt), "frontend_instruct2"
    raise ValueError(f"unknown e2e_modes mode {mode!r}")


def _model_input_row(v: str, label: str, mi: dict, arrays: dict, how: str) -> Result:
    """Exact: the builder keeps the recorded keys (ignoring `*_len`) with the recorded values."""
    got = {k for k in mi if not k.endswith("_len")}
    want = set(arrays)
    bad = sorted(got ^ want)
    for k in sorted(got & want):
        if k == "text" and not isinstance(mi[k], np.ndarray):
            continue  # bistream generator: the ids it yields are compared in the text_ids row
        if not np.array_equal(np.asarray(mi[k]), arrays[k]) or np.asarray(mi[k]).shape != arrays[k].shape:
            bad.append(k)
    return Result(v, COMPONENT, f"{label} model_input", float(len(bad)), float(len(bad)), 0.0, not bad,
                  f"{how}" + (f"; differs: {', '.join(bad)}" if bad else f"; keys {', '.join(sorted(want))}"))


class _BistreamTokens:
    """Iterable of speech tokens from `generate_bistream` over `mi['text']` (a generator of [1, 1] ids), cut
    where the reference forced eos: after `stop` decoded steps, fill steps included."""

    def __init__(self, engine, mi: dict, stop: int):
        self.engine, self.mi, self.stop = engine, mi, int(stop)
        self.tokens: list[int] = []
        self.text_ids: list[int] = []
        self.bad_pieces: list = []
        self.fills = 0
        self._tok_since_pull = False

    def _pulled(self):
        if self._tok_since_pull:  # a decode segment ended before the next text id: it ended on a fill
            self.fills += 1
        self._tok_since_pull = False

    def _text(self):
        for piece in self.mi["text"]:
            self._pulled()
            a = np.asarray(piece)
            if a.shape != (1, 1):
                self.bad_pieces.append(a.shape)
            self.text_ids.extend(int(t) for t in a.reshape(-1))
            yield a
        self._pulled()

    def __iter__(self):
        from cosyjax.llm.bistream import generate_bistream

        eng = self.engine
        gen = generate_bistream(eng.params["llm"], eng.config.llm, self._text(), self.mi.get("prompt_text"),
                                self.mi.get("llm_prompt_speech_token"), sampling="greedy")
        for t in gen:
            if len(self.tokens) + 1 + self.fills > self.stop:
                gen.close()
                return
            self._tok_since_pull = True
            self.tokens.append(int(t))
            yield int(t)


def _llm_rows(v: str, label: str, engine, mi: dict, rec: dict, stream: bool) -> tuple[list[Result], np.ndarray]:
    """Greedy LLM tokens (exact) and per-step top-32 log-probs of one text case -> (rows, tokens)."""
    import jax

    g = engine.llm_generation(mi, jax.random.PRNGKey(0), sampling="greedy", record_topk=32)
    n = int(g.lengths[0])
    toks = np.asarray(g.tokens)[0, :n].astype(np.int64)
    want = rec["llm_logp_top32_values"]
    topv = np.asarray(g.logp_topk_values)[0, :min(len(want), n + 1)]
    m = min(len(want), len(topv))
    rows = [exact(v, COMPONENT, f"{label} llm_tokens", toks, rec["llm_tokens"].astype(np.int64),
                  note=f"{n} tokens, greedy"),
            e2e.lm_input_row(v, COMPONENT, label, engine, mi, rec),
            compare(v, COMPONENT, f"{label} llm_logp_top32", topv[:m], want[:m], e2e.LOGP_TOL,
                    note="" if m == len(want) else f"{m}/{len(want)} steps")]
    return rows, toks


def check_case(ctx: FixtureContext, engine, case: dict, spec: dict, fixed) -> list[Result]:
    """Rows of one listed case: build the model input, run the LLM path of its mode, `Engine.tts`, compare."""
    import jax

    v, label = ctx.version, case["name"][:-4]
    z = ctx.npz(FOLDER, case["inputs"])
    arrays = {k: z[k] for k in z}  # item access: the runner sees every input as read
    rec = ctx.npz(FOLDER, case["name"])
    stream, speed = bool(case["stream"]), float(case["speed"])
    mi, how = build_model_input(engine, case["mode"], arrays, bool(case.get("text_generator")))
    rows = [_model_input_row(v, label, mi, arrays, how)]
    records: list = []
    run = dict(stream=stream, speed=speed, key=jax.random.PRNGKey(0), records=records,
               noise_provider=e2e.noise_provider(ctx, rec, fixed))
    if case["mode"] == "vc":  # no LLM: the source tokens go to the flow unfiltered
        flow_tokens = np.asarray(mi["source_speech_token"]).reshape(-1).astype(np.int64)
        rows.append(exact(v, COMPONENT, f"{label} llm_tokens", np.zeros(0, np.int64),
                          rec["llm_tokens"].astype(np.int64), note="no LLM (source tokens)"))
        chunks = list(engine.tts(mi, **run))
    elif case.get("text_generator"):
        toks = _BistreamTokens(engine, mi, spec["bistream_stop"])
        llm = np.asarray(list(toks), np.int64)  # the generator text is consumed here, once
        rows.append(exact(v, COMPONENT, f"{label} text_ids", np.asarray(toks.text_ids, np.int64),
                          arrays["text"].reshape(-1).astype(np.int64),
                          note="ids the frontend generator yielded, one [1, 1] at a time"
                          + (f"; bad piece shapes {toks.bad_pieces}" if toks.bad_pieces else "")))
        rows[-1].passed = rows[-1].passed and not toks.bad_pieces
        rows.append(exact(v, COMPONENT, f"{label} llm_tokens", llm, rec["llm_tokens"].astype(np.int64),
                          note=f"{len(llm)} tokens, generate_bistream greedy, eos forced at step "
                               f"{spec['bistream_stop']} ({toks.fills} fill steps)"))
        flow_tokens = e2e.flow_tokens_of(engine, llm)
        chunks = list(engine.tts(mi, tokens=iter(llm.tolist()), **run))
    else:
        llm_rows, llm = _llm_rows(v, label, engine, mi, rec, stream)
        rows += llm_rows
        flow_tokens = e2e.flow_tokens_of(engine, llm)
        # tokens delivered one at a time, as a streaming LLM would
        chunks = list(engine.tts(mi, tokens=iter(llm.tolist()), **run))
    return rows + e2e.replay_rows(v, COMPONENT, label, engine, mi, flow_tokens, chunks, records, rec, stream)


def check(ctx: FixtureContext) -> list[Result]:
    if not ctx.has(FOLDER, "meta.json") or not ctx.has("modeldir"):
        return []
    meta = ctx.json(FOLDER, "meta.json")
    engine = e2e.engine_for(ctx.model_dir)
    fixed = ctx.npz(FOLDER, "cv3_hift_fixed_noise.npz") if ctx.version == "cosyvoice3" else None
    rows: list[Result] = []
    for case in _cases(ctx):
        label = case["name"][:-4]
        if not (ctx.has(FOLDER, case["name"]) and ctx.has(FOLDER, case["inputs"])):
            continue  # the runner reports the missing listed file
        try:
            rows.extend(check_case(ctx, engine, case, meta["spec"], fixed))
        except Exception as e:  # one case crashing is that case's failed row; the other cases still run
            rows.append(failure(ctx.version, COMPONENT, f"{label} (error)",
                                f"{type(e).__name__}: {e}".splitlines()[0][:200]))
    return rows
