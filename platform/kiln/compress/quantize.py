"""int8 post-training quantization with ONNX Runtime.

Chosen by measurement on x86 (see BENCHMARKS.md): the model is exported to ONNX, BatchNorm folded
(ONNX Runtime's pre-processing), then
- static: weights and activations int8 in QDQ form, activation ranges calibrated on N rows of the
  train split; ONNX Runtime fuses the QDQ pairs into int8 kernels (VNNI / AMX where the CPU has
  them);
- dynamic: only MatMul/Gemm (Linear) weights int8, activations quantized on the fly per batch.
torch.ao.quantization's eager/FX flows are deprecated in this torch and not used.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from kiln.compress.config import QuantizeStep
from kiln.errors import ConfigError

CALIBRATION_BATCH = 32


def calibration_rows(
    x_train: np.ndarray, samples: int, seed: int, where: str, split_rows: int | None = None
) -> np.ndarray:
    """``samples`` rows of ``x_train`` (the driver's sample of the train split, ``split_rows`` rows
    in all), drawn without replacement (seeded). ConfigError if too many."""
    if samples > len(x_train) and split_rows is not None and split_rows > len(x_train):
        raise ConfigError(
            f"config key '{where}.calibration_samples': {samples} calibration samples requested, "
            f"but the driver keeps a sample of {len(x_train)} train rows (raise data.sample_rows)"
        )
    if samples > len(x_train):
        raise ConfigError(
            f"config key '{where}.calibration_samples': {samples} calibration samples requested, "
            f"but the train split has only {len(x_train)} rows"
        )
    idx = np.random.default_rng(seed).choice(len(x_train), size=samples, replace=False)
    return np.ascontiguousarray(x_train[np.sort(idx)])


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """Drop ONNX Runtime's quantizer hints below ERROR while quantizing, and nothing else.

    Its quantizer modules log through the root logger's module functions (``logging.warning``),
    and its pre-processing through named ``onnxruntime.quantization.*`` loggers: a filter on the
    root logger keeps only the records those modules log themselves; the named logger's level is
    restored afterwards. Nothing is configured outside this block.
    """
    import onnxruntime.quantization as ort_quantization

    package_dir = str(Path(ort_quantization.__file__).parent)

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not record.pathname.startswith(package_dir)

    root, named = logging.getLogger(), logging.getLogger("onnxruntime.quantization")
    level = named.level
    root.addFilter(keep)
    named.setLevel(logging.ERROR)
    try:
        yield
    finally:
        named.setLevel(level)
        root.removeFilter(keep)


def quantize_onnx(fp32_model, step: QuantizeStep, calibration: np.ndarray | None):
    """int8 onnx.ModelProto from an fp32 onnx.ModelProto (the export of a torch model)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with _quiet_quantizer(), tempfile.TemporaryDirectory(prefix="kiln-quant-") as tmp:
        src, pre, out = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        onnx.save(fp32_model, str(src))
        # Folds BatchNorm into Conv and cleans the graph so that whole Conv+ReLU blocks quantize.
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        if step.mode == "dynamic":
            quantize_dynamic(
                str(pre),
                str(out),
                weight_type=QuantType.QInt8,
                op_types_to_quantize=["MatMul", "Gemm"],
            )
        else:
            if calibration is None:
                raise ValueError("static int8 quantization needs calibration rows")
            rows = calibration
            input_name = fp32_model.graph.input[0].name

            class Reader(CalibrationDataReader):
                def __init__(self):
                    self.batches = iter(
                        [
                            {input_name: rows[i : i + CALIBRATION_BATCH]}
                            for i in range(0, len(rows), CALIBRATION_BATCH)
                        ]
                    )

                def get_next(self):
                    return next(self.batches, None)

            method = {
                "minmax": CalibrationMethod.MinMax,
                "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile,
            }[step.calibration_method]
            quantize_static(
                str(pre),
                str(out),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=step.per_channel,
                weight_type=QuantType.QInt8,
                activation_type=QuantType.QUInt8,
                calibrate_method=method,
            )
        return onnx.load(str(out))


def quantized_op_count(model) -> int:
    """Number of int8 weight initializers in an ONNX model (0: nothing was quantized)."""
    import onnx

    return sum(
        1
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2
    )
