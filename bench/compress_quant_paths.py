"""Which int8 path pays on this CPU? The same CNN (28x28 input) timed side by side in every round.

Compares batch-256 throughput and batch-1 latency of: torch eager fp32, ONNX Runtime fp32, ONNX
Runtime int8 static QDQ (what ``kiln compress`` uses), ONNX Runtime int8 dynamic, and, unless
--skip-inductor, torch.compile fp32 and torchao's PT2E int8 (X86InductorQuantizer) compiled with
inductor and freezing. Speed does not depend on trained values, so the network keeps its initial
weights (BatchNorm statistics taken from random inputs); accuracy is measured by
bench/compress_mnist.py.

    PYTHONPATH=platform python bench/compress_quant_paths.py [--width 64] [--rounds 7]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
warnings.filterwarnings("ignore")


def timed(fn, x, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument(
        "--skip-inductor",
        action="store_true",
        help="skip torch.compile / PT2E (minutes of compiling)",
    )
    args = ap.parse_args()

    import torch

    from kiln.compress.config import QuantizeStep
    from kiln.compress.quantize import quantize_onnx
    from kiln.compress.report import machine_info
    from kiln.data.preprocess import Preprocessing
    from kiln.models.builders import build_cnn
    from kiln.models.onnx_artifact import export_onnx_model, onnx_runtime, save_onnx_artifact
    from kiln.models.spec import ModelSpec

    info = machine_info()
    print(
        f"machine: {info['cpu']}, {info['cpus']} CPUs, flags: {' '.join(info['flags'])}; "
        f"torch {info['torch']}, onnxruntime {info['onnxruntime']}"
    )
    torch.manual_seed(0)
    model = build_cnn([1, 28, 28], 10, width=args.width)
    calib = torch.randn(512, 1, 28, 28)
    model.train()
    with torch.no_grad():
        model(calib)
    model.eval()
    xb, x1 = torch.randn(256, 1, 28, 28), torch.randn(1, 1, 28, 28)
    spec = ModelSpec(
        "cnn",
        {"width": args.width},
        [1, 28, 28],
        list(range(10)),
        Preprocessing(kind="image", mean=[0.0], std=[1.0], channels=1, image_size=[28, 28]),
    )
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="kiln-qpaths-"))
    fp32 = export_onnx_model(model, [1, 28, 28])
    paths = {
        "ort_fp32": save_onnx_artifact(fp32, spec, tmp / "fp32"),
        "ort_int8_static": save_onnx_artifact(
            quantize_onnx(fp32, QuantizeStep(kind="quantize"), calib[:256].numpy()),
            spec,
            tmp / "static",
        ),
        "ort_int8_dynamic": save_onnx_artifact(
            quantize_onnx(fp32, QuantizeStep(kind="quantize", mode="dynamic"), None),
            spec,
            tmp / "dyn",
        ),
    }

    def eager(x):
        with torch.inference_mode():
            return model(x)

    fns = {"torch_eager_fp32": (eager, xb, x1)}
    for name, path in paths.items():
        run = onnx_runtime(path, spec)
        fns[name] = (run, xb.numpy(), x1.numpy())
    if not args.skip_inductor:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = (
            True  # constant-folds weights: needed for int8 to beat compiled fp32
        )
        try:
            t0 = time.perf_counter()
            compiled = torch.compile(model)
            with torch.inference_mode():
                compiled(xb), compiled(x1)
            fns["torch_compile_fp32"] = (lambda x: compiled(x), xb, x1)
            print(f"torch.compile fp32: compiled in {time.perf_counter() - t0:.0f} s")
        except Exception as exc:
            print(
                f"torch.compile fp32 failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            )
        try:
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
            from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

            t0 = time.perf_counter()
            quantizer = xiq.X86InductorQuantizer().set_global(
                xiq.get_default_x86_inductor_quantization_config()
            )
            exported = torch.export.export(
                model, (xb,), dynamic_shapes=({0: torch.export.Dim("batch")},)
            ).module()
            prepared = prepare_pt2e(exported, quantizer)
            prepared(calib[:256])
            converted = convert_pt2e(prepared)
            qcompiled = torch.compile(converted)
            with torch.inference_mode():
                qcompiled(xb), qcompiled(x1)
            fns["pt2e_int8_inductor"] = (lambda x: qcompiled(x), xb, x1)
            print(f"PT2E int8 + inductor: compiled in {time.perf_counter() - t0:.0f} s")
        except Exception as exc:
            print(
                f"PT2E int8 + inductor failed: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200]}"
            )

    thr = {n: [] for n in fns}
    lat = {n: [] for n in fns}
    for fn, b, one in fns.values():  # warm-up
        with torch.inference_mode():
            fn(b), fn(one)
    for _ in range(args.rounds):
        for name, (fn, b, one) in fns.items():
            with torch.inference_mode():
                thr[name].append(256 / timed(fn, b, 3))
                lat[name].append(1000 * timed(fn, one, 50))
    base = np.median(thr["ort_fp32"])
    eager_thr = np.median(thr["torch_eager_fp32"])
    print(
        f"\n{'path':22s} {'batch-256 samples/s':>20s} {'x ORT fp32':>10s} {'x eager':>8s} "
        f"{'batch-1 p50 ms':>15s}"
    )
    for name in fns:
        t = np.median(thr[name])
        print(
            f"{name:22s} {t:20,.0f} {t / base:10.2f} {t / eager_thr:8.2f} "
            f"{np.median(lat[name]):15.3f}"
        )
    sizes = {
        n: sum(f.stat().st_size for f in p.iterdir() if f.name != "MLmodel")
        for n, p in paths.items()
    }
    print(
        "sizes (bytes, spec.json + model.onnx): "
        + ", ".join(f"{n} {s:,}" for n, s in sizes.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
