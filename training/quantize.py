"""int8 prediction on CPU through ONNX Runtime, and an ONNX export that carries its own contract.

    export_onnx(model, cfg, params, path)        fp32 ONNX with the preprocessing and label scheme
                                                 in its metadata (``read_contract`` reads them back)
    quantize_onnx(fp32_path, int8_path, batches)  static int8 (QDQ: int8 per-channel weights, uint8
                                                 activations, MinMax ranges from `batches`)
    int8_model(model, cfg, params)               the quantized model for a trained model, made once
                                                 and cached by the weights' digest; calibrated on
                                                 phantom slices preprocessed like training data
    int8_gate(model, cfg, params)                whether this model may run in int8 under ``auto``:
                                                 its int8 labels agree with fp32's on held-out
                                                 phantom slices (cached beside the int8 file)
    OnnxModel(path)                              a ``torch.nn.Module`` that runs an ONNX file in
                                                 ONNX Runtime, so ``training.predict`` runs it as is

Why ONNX Runtime: torch 2.13's own int8 path (PT2E) moved out of torch into torchao and gets its
speed from torch.compile; ONNX Runtime's CPU int8 convolutions (VNNI where the CPU has it) run
eagerly and are maintained. Optional: ``pip install onnx onnxruntime onnxscript``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import warnings
from collections.abc import Iterable, Sequence
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import torch
from torch import nn

from network.unet import fold_batchnorm
from training.config import TrainConfig
from training.cpu import cache_folder, log_line, usable_cpu_count
from utils.errors import UserError
from utils.files import atomic_path, write_json
from utils.labels import ORGANS
from utils.geometry import PreprocessParams, preprocess_image

OPSET = 18
CONTRACT_KEY = "abdoseg_contract"  # ONNX metadata: JSON of config, preprocessing, label scheme
CALIBRATION_SLICES = 9  # one slice per batch; odd, so the last range merge has data
# The int8 gate: under ``auto`` a model runs in int8 only if, on GATE_SLICES slices of a phantom
# the quantizer never saw (seed GATE_SEED; calibration uses seed 0), its int8 labels agree with
# its fp32 labels at a mean organ Dice of at least INT8_MIN_AGREEMENT. 0.98 was set on the demo
# model (2-core AMD EPYC): agreement 0.983 and 0.987 on two phantoms where its test-set Dice lost
# 0.007 in int8, inside the 0.01 the project allows; a model whose labels move more stays in
# fp32/bf16.
INT8_MIN_AGREEMENT = 0.98
GATE_SEED, GATE_SLICES = 7, 16


PRECISIONS = ("auto", "fp32", "bf16", "int8")


class Int8Unavailable(UserError):
    """int8 asked for, but ONNX Runtime (or onnx / onnxscript) is not installed."""


@contextlib.contextmanager
def _quiet():
    """Silence the quantizer's advice on the root logger and its warnings."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def prediction_model(model: nn.Module, cfg: TrainConfig, params: PreprocessParams, device: torch.device,
                     precision: str = "auto", log=None) -> tuple[nn.Module, torch.dtype | None, str, bool]:
    """What prediction runs: ``(model, autocast dtype or None, precision name, channels_last)``.

    Args:
        precision: ``"auto"``: on CPU, the fastest of fp32, bf16 (native-bf16 CPUs) and int8
            (ONNX Runtime installed) on this model's layer shapes, and the faster layout
            (``training.cpu.choose_cpu_precision``, cached); int8 only if this model passes
            :func:`int8_gate`, else the faster of the others. A checkpoint whose config forces
            ``amp`` keeps it; off CPU, today's rule (``select_amp``). ``"fp32"``, ``"bf16"``,
            ``"int8"`` force one (int8: CPU only, no gate); a forced precision keeps the config's
            ``channels_last``.
    """
    from training.cpu import available_candidates, choose_cpu_precision
    from training.runtime import select_amp
    if precision not in PRECISIONS:
        raise UserError(f"must be one of {', '.join(PRECISIONS)}, got {precision!r}", "--precision")
    if precision == "auto":
        if device.type != "cpu" or cfg.amp != "auto":
            dtype = select_amp(device, cfg.amp, cfg, purpose="predict")
            return model, dtype, {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32"), cfg.channels_last
        candidates = available_candidates("predict", include_int8=True)
        choice = choose_cpu_precision(cfg.features, cfg.in_channels, "predict", candidates, log=log)
        if choice.precision == "int8":
            gate = int8_gate(model, cfg, params, log=log)
            if gate["passed"]:
                return gate["model"], None, "int8", cfg.channels_last
            choice = choose_cpu_precision(cfg.features, cfg.in_channels, "predict", available_candidates("predict"),
                                          log=log)  # the fastest without int8
        precision, channels_last = choice.precision, cfg.channels_last and choice.channels_last
    else:
        channels_last = cfg.channels_last
    if precision == "int8":
        if device.type != "cpu":
            raise UserError(f"int8 runs on CPU only, not on {device}", "--precision")
        return int8_model(model, cfg, params, log=log), None, "int8", cfg.channels_last
    return model, torch.bfloat16 if precision == "bf16" else None, precision, channels_last


def _import_onnxruntime():
    """``import onnxruntime`` with its telemetry off: otherwise it writes a ``.ses`` file into the
    current folder, which may be the user's."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime
    return onnxruntime


def onnxruntime_available() -> bool:
    """True when onnx, onnxruntime and onnxscript (torch's ONNX exporter) import."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
        _import_onnxruntime()
    except ImportError:
        return False
    return True


def _require_onnxruntime() -> None:
    if not onnxruntime_available():
        raise Int8Unavailable("int8 prediction needs ONNX Runtime: pip install onnx onnxruntime onnxscript",
                              "--precision")


def export_onnx(model: nn.Module, cfg: TrainConfig, params: PreprocessParams, path) -> Path:
    """Write `model` (BatchNorm folded, fp32) as ONNX for ``(B, in_channels, H, W)`` inputs in [0, 1].

    The batch dimension is dynamic; H and W are ``params.target_size``. The file's metadata
    ``abdoseg_contract`` holds the config, the preprocessing (``PreprocessParams``: window, size,
    spacing; the model sees ``uint8 / 255``) and the label scheme (organ names by id).
    """
    import onnx
    folded = fold_batchnorm(model).float().eval()
    example = torch.rand(2, cfg.in_channels, *params.target_size)
    batch = torch.export.Dim("batch", min=1)
    with _quiet(), redirect_stdout(io.StringIO()):  # the exporter reports each stage
        program = torch.onnx.export(folded, (example,), input_names=["image"], output_names=["logits"],
                                    dynamic_shapes=({0: batch},), opset_version=OPSET, dynamo=True,
                                    verbose=False)
    proto = program.model_proto
    contract = {"config": cfg.to_dict(), "preprocess": params.to_dict(), "organs": list(ORGANS),
                "input": "image (B, in_channels, H, W) float32 = preprocessed uint8 / 255",
                "output": "logits (B, num_classes, H, W)"}
    onnx.helper.set_model_props(proto, {CONTRACT_KEY: json.dumps(contract)})
    with atomic_path(path) as temporary:
        onnx.save(proto, str(temporary))
    return Path(path)


def read_contract(path) -> dict:
    """The ``abdoseg_contract`` metadata of an ONNX file written by :func:`export_onnx`."""
    import onnx
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if CONTRACT_KEY not in props:
        raise UserError("not an abdoseg ONNX model (no abdoseg_contract metadata)", path)
    return json.loads(props[CONTRACT_KEY])


def quantize_onnx(fp32_path, int8_path, batches: Iterable[np.ndarray]) -> Path:
    """Static int8 quantization of an ONNX model; activation ranges from `batches` (MinMax).

    Args:
        batches: float32 arrays ``(B, C, H, W)`` like the model's real inputs.
    """
    _import_onnxruntime()
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter({"image": np.ascontiguousarray(b, dtype=np.float32)} for b in batches)

        def get_next(self):
            return next(self.items, None)

    with atomic_path(int8_path) as temporary, _quiet():
        quantize_static(str(fp32_path), str(temporary), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        # ranges merged every 2 batches: memory of 2 batches' activations, not all
                        # (ONNX Runtime needs an odd number of batches then: see calibration_batches)
                        extra_options={"CalibMaxIntermediateOutputs": 2})
    return Path(int8_path)


def calibration_batches(params: PreprocessParams, in_channels: int, slices: int = CALIBRATION_SLICES,
                        batch_size: int = 1, seed: int = 0) -> list[np.ndarray]:
    """Phantom slices preprocessed as for training: ``(B, in_channels, H, W)`` float32 in [0, 1].

    Deterministic (phantom `seed`; 0 calibrates the quantizer, ``GATE_SEED`` feeds the gate);
    `slices` slices spread over the abdomen, neighbours stacked for 2.5D. Uses no data but the
    built-in phantom.
    """
    from utils.phantom import make_phantom
    from utils.volume_io import Volume
    phantom = make_phantom(seed, 0, size=max(params.target_size), num_slices=4 * slices)
    volume = Volume(phantom.hu, tuple(phantom.spacing), phantom.affine, phantom.affine, phantom.hu.shape, "phantom")
    image = preprocess_image(volume, params).float().div_(255)  # (Z, H, W)
    centres = torch.linspace(2, image.shape[0] - 3, slices).round().long()
    offsets = torch.arange(in_channels) - in_channels // 2
    stacked = image[(centres[:, None] + offsets).clamp_(0, image.shape[0] - 1)]  # (slices, C, H, W)
    return [stacked[i:i + batch_size].numpy() for i in range(0, slices, batch_size)]


def weights_digest(model: nn.Module, cfg: TrainConfig, params: PreprocessParams) -> str:
    """sha256 over the weights, the config and the preprocessing: the int8 cache key."""
    digest = hashlib.sha256(json.dumps([cfg.to_dict(), params.to_dict(), OPSET], sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def int8_model(model: nn.Module, cfg: TrainConfig, params: PreprocessParams, log=None) -> "OnnxModel":
    """The int8 ONNX Runtime model of a trained `model`, made once per weights and cached.

    The quantized file lives in ``cache_folder()/int8/<digest>.onnx`` (safe to delete: it is made
    again, about 20 s for the seed model on a 2-core CPU).
    """
    _require_onnxruntime()
    folder = cache_folder() / "int8"
    int8_path = folder / f"{weights_digest(model, cfg, params)}.onnx"
    if not int8_path.is_file():
        if log:
            log(f"int8: quantizing the model once (cached in {int8_path})")
        fp32_path = folder / f"{int8_path.stem}.fp32.onnx"
        export_onnx(model, cfg, params, fp32_path)
        try:
            quantize_onnx(fp32_path, int8_path, calibration_batches(params, cfg.in_channels))
        finally:
            fp32_path.unlink(missing_ok=True)
    return OnnxModel(int8_path, in_channels=cfg.in_channels)


def label_agreement(first: torch.Tensor, second: torch.Tensor, num_classes: int) -> float:
    """Mean over organs (classes ``1..num_classes-1``) present in either label map of the Dice
    between the two; 1.0 when neither has an organ (the maps then agree everywhere)."""
    dice = []
    for organ in range(1, num_classes):
        a, b = first == organ, second == organ
        total = int(a.sum() + b.sum())
        if total:
            dice.append(2 * int((a & b).sum()) / total)
    return float(np.mean(dice)) if dice else 1.0


def int8_gate(model: nn.Module, cfg: TrainConfig, params: PreprocessParams, log=None) -> dict:
    """May this model run in int8 under ``auto``? Its int8 labels against its fp32 labels.

    Both predict ``GATE_SLICES`` slices of phantom ``GATE_SEED`` (never used to calibrate the
    quantizer); ``agreement`` is their :func:`label_agreement` and ``passed`` is agreement >=
    ``INT8_MIN_AGREEMENT``. Measured once per weights (a few seconds; the int8 model is made if
    needed) and cached beside the int8 file as ``<digest>.gate.json``.

    Returns:
        ``{"passed", "agreement", "min_agreement", "slices", "model": the OnnxModel}``.
    """
    log = log or log_line
    int8 = int8_model(model, cfg, params, log=log)
    gate_path = int8.path.with_name(f"{int8.path.stem}.gate.json")
    try:
        gate = json.loads(gate_path.read_text())
        float(gate["agreement"])
    except (OSError, ValueError, KeyError, TypeError):
        images = torch.from_numpy(calibration_batches(params, cfg.in_channels, GATE_SLICES, GATE_SLICES,
                                                      seed=GATE_SEED)[0])  # (GATE_SLICES, C, H, W)
        with torch.inference_mode():
            reference = torch.cat([model(batch) for batch in images.split(4)]).argmax(1)
            quantized = int8(images).argmax(1)
        gate = {"agreement": label_agreement(reference, quantized, cfg.num_classes), "slices": GATE_SLICES,
                "seed": GATE_SEED}
        write_json(gate_path, gate)
    gate["min_agreement"] = INT8_MIN_AGREEMENT
    gate["passed"] = gate["agreement"] >= INT8_MIN_AGREEMENT
    verdict = "int8 runs" if gate["passed"] else "int8 refused for this model"
    log(f"int8 gate: labels agree with fp32 at {gate['agreement']:.4f} (mean organ Dice on "
            f"{gate['slices']} held-out phantom slices; needs {INT8_MIN_AGREEMENT}): {verdict}")
    return {**gate, "model": int8}


class OnnxModel(nn.Module):
    """An ONNX file run by ONNX Runtime on CPU, called like the U-Net: logits for images.

    Shape:
        input ``(B, in_channels, H, W)`` float (any memory format); output logits
        ``(B, classes, H, W)`` float32 torch tensor on CPU.
    """

    def __init__(self, path, in_channels: int = 1, threads: int | None = None):
        super().__init__()
        onnxruntime = _import_onnxruntime()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or usable_cpu_count()
        options.inter_op_num_threads = 1
        # sleep instead of spinning between operators: fairer on a shared machine
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.path, self.in_channels = Path(path), in_channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()  # (B, C, H, W)
        return torch.from_numpy(self.session.run(None, {"image": array})[0])


# --------------------------------------------------------------------------- calibration probe

def int8_probe_runner(shapes: Sequence[tuple[int, int]]):
    """A function running int8 DoubleConv probes (``training.cpu.probe_shapes``) in ONNX Runtime.

    Each probe is two 3x3 conv + ReLU layers of the given width, quantized like the real model,
    so ``training.cpu.measure_candidates`` times int8 on the same shapes as fp32 and bf16.
    """
    import tempfile
    _require_onnxruntime()
    runs = []
    with tempfile.TemporaryDirectory(prefix="abdoseg-probe-") as folder:
        for index, (width, size) in enumerate(shapes):
            fp32_path, int8_path = Path(folder) / f"{index}.onnx", Path(folder) / f"{index}.int8.onnx"
            _write_probe_onnx(width, fp32_path)
            image = np.random.default_rng(0).random((1, width, size, size), dtype=np.float32)
            quantize_onnx(fp32_path, int8_path, [image])
            model = OnnxModel(int8_path)
            runs.append((model.session, image))
    return lambda: [session.run(None, {"image": image}) for session, image in runs]


def _write_probe_onnx(width: int, path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    nodes, initializers, previous = [], [], "image"
    for layer in range(2):
        weight = (rng.standard_normal((width, width, 3, 3)) / np.sqrt(9 * width)).astype(np.float32)
        initializers += [numpy_helper.from_array(weight, f"w{layer}"),
                         numpy_helper.from_array(np.zeros(width, np.float32), f"b{layer}")]
        nodes += [helper.make_node("Conv", [previous, f"w{layer}", f"b{layer}"], [f"c{layer}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{layer}"], [f"r{layer}"])]
        previous = f"r{layer}"
    graph = helper.make_graph(
        nodes, "probe", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, width, None, None])],
        [helper.make_tensor_value_info(previous, TensorProto.FLOAT, [None, width, None, None])], initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), str(path))
