"""CPU specifics: how many threads, how they wait, and which precision pays on *this* CPU.

Three things differ from one x86 CPU to the next and are decided here by measurement, not by
reading feature flags:

threads     ``usable_cpu_count()``: the CPUs this process may run on (``os.sched_getaffinity``,
            and a cgroup CPU quota when one is set), not the machine's core count.
            ``configure_threads()`` sets torch's intra-op pool to it.
waiting     ``openmp_environment()``: how idle OpenMP threads wait between parallel regions.
            PyTorch's CPU build uses GNU OpenMP (libgomp), whose threads spin before sleeping;
            two spinning pools on a shared 2-core machine slow each other down many times over.
            libgomp reads its settings once, when it is loaded (``import torch``), so
            ``prepare_openmp_environment()`` must run before that; the command line does it
            first thing. A variable the user has set is never changed.
precision   ``choose_cpu_precision(...)``: fp32 against bf16 (and int8 for prediction, which a
            model then runs only if it passes ``training.quantize.int8_gate``), then the memory
            layout, channels_last against contiguous, for the winner (whole U-Net probe: the
            layout's cost is in pooling, up-sampling and joins too, not only in the
            convolutions). Precisions are timed on the model's own layer widths (one DoubleConv
            block at the first and the last encoder width of the configured U-Net), forward +
            backward for training and forward for prediction, interleaved, 2-6 s in all (the seed
            model). The result is cached per (CPU model, torch version, model shape, purpose) in
            ``cache_folder()/cpu_precision.json`` (safe to delete: it is measured again) and
            logged as one line.

Only the standard library is imported at module level, so ``prepare_openmp_environment`` can
run before torch is loaded.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

CACHE_ENV = "ABDOSEG_CACHE_DIR"      # overrides the cache folder
CACHE_FILE = "cpu_precision.json"
CONTIGUOUS = "/contiguous"           # suffix of a timing in the contiguous (NCHW) layout
WHOLE = " unet"                      # suffix of a whole-U-Net timing (the layout probe)
LAYOUT_MARGIN = 0.05                 # contiguous is taken only when this much faster (rounds differ by a
                                     # few % on their own; channels_last is what every CPU measured so far
                                     # ran faster)
LAYOUT_PROBE_SIZE = 128              # whole-U-Net probe image: the deepest level of 4 is 16 x 16
CALIBRATION_SECONDS = 2.0            # time budget of one calibration (at least MIN_ROUNDS rounds)
MIN_ROUNDS, MAX_ROUNDS = 3, 20
PROBE_GFLOP = 0.4                    # forward conv GFLOP of one probe call (sets its spatial size)
TRAIN_CANDIDATES = ("fp32", "bf16")

# How idle OpenMP threads wait. "passive": sleep at once instead of spinning. Measured on the
# project's 2-core AMD EPYC while other CPU-bound work ran (no quiet machine was available):
#   demo-sized bf16 step (features 16..128, batch 16, 128 x 128), load ~3-6, median of 3-6 steps,
#   two rounds: default 13.2 / 5.8 img/s, passive 14.6 / 9.1, single thread 15.4 / 10.0;
#   a tiny fit (features 8, 16; 32 x 32; 20 steps of 8), load 12-14, two rounds: default 5.5 / 3.5
#   img/s, passive 37.0 / 38.5, single thread 96.9 / 109.3.
# Single thread wins under load but halves a quiet machine's speed; passive is the default until
# a quiet comparison (benchmarks/train_throughput.py --policy NAME [--contended]) says otherwise.
OPENMP_POLICIES = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "short_spin": {"GOMP_SPINCOUNT": "10000"},
    "single_thread": {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"},
}
DEFAULT_OPENMP_POLICY = "passive"
POLICY_ENV = "ABDOSEG_OPENMP_POLICY"  # choose another policy by name (benchmarks use it)


# --------------------------------------------------------------------------- threads

def usable_cpu_count() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota if set."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        count = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(count, math.ceil(quota)) if quota else count)


def cgroup_cpu_quota(path: str | Path = "/sys/fs/cgroup/cpu.max") -> float | None:
    """CPUs allowed by the cgroup v2 quota (``"max 100000"`` = none -> None)."""
    try:
        quota, period = Path(path).read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def configure_threads() -> int:
    """Set torch's intra-op threads to :func:`usable_cpu_count` (if it differs); returns the count."""
    import torch
    count = usable_cpu_count()
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


def openmp_environment(policy: str | None = None) -> dict[str, str]:
    """Environment variables of an OpenMP wait policy (``OPENMP_POLICIES``), default passive."""
    policy = policy or os.environ.get(POLICY_ENV) or DEFAULT_OPENMP_POLICY
    if policy not in OPENMP_POLICIES:
        from utils.errors import UserError
        raise UserError(f"unknown OpenMP policy {policy!r} (known: {', '.join(OPENMP_POLICIES)})", POLICY_ENV)
    return dict(OPENMP_POLICIES[policy])


def prepare_openmp_environment(policy: str | None = None, environ=os.environ) -> dict[str, str]:
    """Put the policy's variables and ``OMP_NUM_THREADS`` (:func:`usable_cpu_count`) into `environ`
    where the user has not set them.

    Returns what was set. Has an effect only before the OpenMP runtime loads (before
    ``import torch``); afterwards it sets nothing and returns ``{}``.
    """
    if "torch" in sys.modules and environ is os.environ:
        return {}
    wanted = {"OMP_NUM_THREADS": str(usable_cpu_count()), **openmp_environment(policy)}
    added = {key: value for key, value in wanted.items() if key not in environ}
    environ.update(added)
    return added


# --------------------------------------------------------------------------- precision choice

@dataclass
class PrecisionChoice:
    """The precision (and layout) chosen for one purpose on this CPU, and why."""

    precision: str                    # fp32 | bf16 | int8
    channels_last: bool
    purpose: str                      # train | predict
    how: str                          # measured | cache | forced
    seconds: dict[str, float] = field(default_factory=dict)  # candidate -> seconds per probe round
    key: dict = field(default_factory=dict)

    @property
    def dtype(self):
        """Autocast dtype for torch: ``torch.bfloat16`` or None (fp32; int8 runs in ONNX Runtime)."""
        import torch
        return torch.bfloat16 if self.precision == "bf16" else None

    def describe(self) -> str:
        """One line for the run's output."""
        if not self.seconds:
            return f"cpu precision ({self.purpose}): {self.precision} ({self.how})"
        timings = ", ".join(f"{name} {1000 * value:.1f} ms" for name, value in self.seconds.items())
        return (f"cpu precision ({self.purpose}): {self.precision}, channels_last={self.channels_last} "
                f"({self.how}: {timings} per probe round on this CPU's {self.key.get('cpu', '?')})")

    def to_dict(self) -> dict:
        return asdict(self)


def log_line(line: str) -> None:
    """Where a one-line decision goes by default (precision, layout, int8 gate): stderr."""
    print(line, file=sys.stderr, flush=True)


CPUINFO = Path("/proc/cpuinfo")
# vector extensions that set convolution speed: two 2-core CPUs of one model name (a hypervisor often
# shows only "AMD EPYC") ran the partial-label study's training steps about 3x apart (0.15-0.21 s
# with avx512_bf16, 0.34-0.54 s with avx2 only)
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def _cpuinfo_fields() -> dict[str, str]:
    """The first processor's ``/proc/cpuinfo`` fields (lower-case names); empty where there is none."""
    fields: dict[str, str] = {}
    try:
        text = CPUINFO.read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor's block ends here
        name, _, value = line.partition(":")
        fields.setdefault(name.strip().lower(), value.strip())
    return fields


def cpu_features(fields: dict[str, str] | None = None) -> list[str]:
    """The :data:`SPEED_FLAGS` this CPU has (or the `fields` read from cpuinfo), in that order;
    empty off x86 Linux."""
    flags = set((_cpuinfo_fields() if fields is None else fields).get("flags", "").split())
    return [flag for flag in SPEED_FLAGS if flag in flags]


def cpu_model_name() -> str:
    """The CPU as benchmark JSON and the precision cache name it: the model string
    (``/proc/cpuinfo`` "model name", else ``platform.processor()``), then family and model
    numbers and :func:`cpu_features`, which tell apart CPUs that share a name, e.g.
    ``"AMD EPYC (family 25 model 1; avx2 fma)"``."""
    fields = _cpuinfo_fields()
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown"
    details = []
    if "cpu family" in fields and "model" in fields:
        details.append(f"family {fields['cpu family']} model {fields['model']}")
    if "flags" in fields:
        details.append(" ".join(cpu_features(fields)) or "no avx2")
    return f"{name} ({'; '.join(details)})" if details else name


def cache_folder() -> Path:
    """``$ABDOSEG_CACHE_DIR``, else ``$XDG_CACHE_HOME/abdoseg``, else ``~/.cache/abdoseg``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "abdoseg"


def calibration_key(features: Sequence[int], in_channels: int, purpose: str,
                    candidates: Sequence[str]) -> dict:
    """What a cached choice depends on: CPU model, torch version, model shape, purpose (and the
    layouts timed, so choices cached before the layout was measured are measured again)."""
    import torch
    return {"cpu": cpu_model_name(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "features": [int(f) for f in features], "in_channels": int(in_channels), "purpose": purpose,
            "candidates": list(candidates), "layouts": ["channels_last", "contiguous"]}


def cpu_has_bf16() -> bool:
    """True on CPUs with native bf16 arithmetic (AVX512-BF16 or AMX), where bf16 autocast can pay."""
    import torch
    try:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return False


def available_candidates(purpose: str, include_int8: bool = False) -> tuple[str, ...]:
    """Precisions to try, the one rule for training, prediction and the benchmarks: fp32, bf16 on
    CPUs with native bf16, and int8 for prediction when asked (ONNX Runtime installed).
    ``training.quantize.prediction_model`` asks, and runs int8 only for a model that passes
    ``int8_gate`` (on the test's tiny trained model int8 lost 0.013 Dice against fp32: a model's
    int8 fidelity is checked, not assumed)."""
    candidates = ["fp32"]
    if cpu_has_bf16():
        candidates.append("bf16")
    if purpose == "predict" and include_int8:
        from training.quantize import onnxruntime_available
        if onnxruntime_available():
            candidates.append("int8")
    return tuple(candidates)


def choose_cpu_precision(features: Sequence[int] = (64, 128, 256, 512), in_channels: int = 1,
                         purpose: str = "train", candidates: Sequence[str] | None = None,
                         measure: Callable[..., dict[str, float]] | None = None, use_cache: bool = True,
                         log: Callable[[str], None] | None = None) -> PrecisionChoice:
    """The fastest precision for this model on this CPU: from the cache, else measured and cached.

    Args:
        features: the U-Net's encoder widths (``TrainConfig.features``).
        purpose: ``"train"`` (forward + backward) or ``"predict"`` (forward, BatchNorm folded).
        candidates: precisions to try (default :func:`available_candidates`).
        measure: ``measure(features, in_channels, purpose, candidates) -> {candidate: seconds}``
            (default :func:`measure_candidates`); tests pass their own.
        log: where the one-line decision goes (default: stderr).

    Returns:
        The choice, precision and layout (``channels_last`` False only when the whole U-Net ran
        ``LAYOUT_MARGIN`` faster contiguous); ``how`` is ``"cache"`` when it came from the cache file.
    """
    candidates = tuple(candidates or available_candidates(purpose))
    log = log or log_line
    key = calibration_key(features, in_channels, purpose, candidates)
    cached = read_cached_choice(key) if use_cache else None
    if cached is not None:
        log(cached.describe())
        return cached
    seconds = (measure or measure_candidates)(features, in_channels, purpose, candidates)
    fastest = min((name for name in seconds if name in candidates), key=seconds.get)
    whole = seconds.get(fastest + WHOLE), seconds.get(fastest + WHOLE + CONTIGUOUS)
    contiguous = None not in whole and whole[1] * (1 + LAYOUT_MARGIN) < whole[0]
    choice = PrecisionChoice(fastest, not contiguous, purpose, "measured",
                             {k: round(v, 6) for k, v in seconds.items()}, key)
    if use_cache:
        write_cached_choice(choice)
    log(choice.describe())
    return choice


def benchmark_record(device_type: str = "cpu", features: Sequence[int] = (64, 128, 256, 512),
                     in_channels: int = 1) -> dict:
    """What ``amp=auto`` takes on this machine, for benchmark JSON: the CPU model, the thread
    count and, on CPU, the training and prediction choices (from the cache after the first run)."""
    record = {"cpu_model": cpu_model_name(), "usable_cpus": usable_cpu_count(),
              "openmp": {key: os.environ.get(key) for key in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}}
    if device_type == "cpu":
        record["train"] = choose_cpu_precision(features, in_channels, "train").to_dict()
        # what prediction's auto measures; int8 then runs only for a model that passes its gate,
        # and a model that fails it runs the faster of the others
        with_int8 = available_candidates("predict", include_int8=True)
        record["predict"] = choose_cpu_precision(features, in_channels, "predict", with_int8).to_dict()
        if "int8" in with_int8:
            record["predict_without_int8"] = choose_cpu_precision(
                features, in_channels, "predict", available_candidates("predict")).to_dict()
    return record


def read_cached_choice(key: dict) -> PrecisionChoice | None:
    """The cached choice for `key`, or None (no file, another key, or a damaged file)."""
    entries = _read_cache_file()
    entry = entries.get(json.dumps(key, sort_keys=True))
    try:
        choice = PrecisionChoice(**entry)
    except TypeError:  # None, or an entry of another shape
        return None
    if choice.key != key or choice.precision not in key["candidates"]:
        return None
    choice.how = "cache"
    return choice


def write_cached_choice(choice: PrecisionChoice) -> None:
    """Add `choice` to the cache file (a damaged file is replaced); a cache that cannot be written is skipped."""
    from utils.files import write_json
    entries = _read_cache_file()
    entries[json.dumps(choice.key, sort_keys=True)] = {**choice.to_dict(), "how": "measured"}
    try:
        write_json(cache_folder() / CACHE_FILE, entries)
    except OSError:  # a read-only home: the choice is measured again next time
        pass


def _read_cache_file() -> dict:
    from utils.errors import UserError
    from utils.files import read_json
    path = cache_folder() / CACHE_FILE
    if not path.is_file():
        return {}
    try:
        entries = read_json(path, "precision cache")
    except UserError:  # unreadable or not JSON: ignored, and rewritten on the next write
        return {}
    return entries if isinstance(entries, dict) else {}


# --------------------------------------------------------------------------- measurement

def probe_shapes(features: Sequence[int], image_size: int = 256) -> list[tuple[int, int]]:
    """``(width, spatial size)`` of the probe blocks: the first and the last encoder width.

    Each block runs at its level's resolution (``image_size / 2**level``), cropped so that one
    forward is about ``PROBE_GFLOP`` (at least 16 x 16): the widths are the model's own, the
    spatial size only sets how long one call takes.
    """
    shapes = []
    for level in sorted({0, len(features) - 1}):
        width = int(features[level])
        resolution = max(image_size >> level, 16)
        wanted = math.sqrt(PROBE_GFLOP * 1e9 / (36 * width * width))  # 2 convs x 2 x 9 x w^2 per pixel
        shapes.append((width, int(min(resolution, max(16, round(wanted / 8) * 8)))))
    return shapes


def measure_candidates(features: Sequence[int], in_channels: int, purpose: str,
                       candidates: Sequence[str], budget_seconds: float = CALIBRATION_SECONDS) -> dict[str, float]:
    """Seconds of one round of the probe blocks per candidate (minimum over interleaved rounds),
    then of the whole U-Net in the fastest candidate in both layouts (int8 excepted: ONNX Runtime
    picks its own): ``{"fp32": .., "bf16": .., "bf16 unet": .., "bf16 unet/contiguous": ..}``.

    A round runs every probe block once: forward + backward (training mode, BatchNorm) for
    ``purpose="train"``, forward under ``inference_mode`` (convolutions with bias, as after
    BatchNorm folding) for ``"predict"``. Rounds alternate between candidates, so a change in
    load on a shared machine hits them alike; they stop after `budget_seconds` (at least
    ``MIN_ROUNDS``). The layout probe is the configured U-Net on one ``LAYOUT_PROBE_SIZE`` image,
    forward + backward or forward alike, with the same budget.
    """
    best = _fastest_rounds({name: _probe_runner(name, features, purpose) for name in candidates}, budget_seconds)
    fastest = min(best, key=best.get)
    if fastest != "int8":
        layouts = {fastest + WHOLE: _unet_runner(fastest, features, in_channels, purpose, True),
                   fastest + WHOLE + CONTIGUOUS: _unet_runner(fastest, features, in_channels, purpose, False)}
        best.update(_fastest_rounds(layouts, budget_seconds))
    return best


def _fastest_rounds(runners: dict[str, Callable[[], None]], budget_seconds: float) -> dict[str, float]:
    """Minimum seconds per runner over interleaved rounds (at least MIN_ROUNDS, then until the budget)."""
    for run in runners.values():  # first calls create oneDNN primitives and reorder weights
        run()
    best = {name: float("inf") for name in runners}
    started = time.perf_counter()
    for round_number in range(MAX_ROUNDS):
        for name, run in runners.items():
            begin = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - begin)
        if round_number + 1 >= MIN_ROUNDS and time.perf_counter() - started > budget_seconds:
            break
    return best


def _unet_runner(precision: str, features: Sequence[int], in_channels: int, purpose: str,
                 channels_last: bool) -> Callable[[], None]:
    """A function running the whole U-Net once on one image, in `precision` and the given layout."""
    import torch
    from network.unet import UNet, fold_batchnorm
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = UNet(in_channels=in_channels, features=tuple(features))
    model = (model.train() if purpose == "train" else fold_batchnorm(model.eval())).to(memory_format=layout)
    image = torch.rand(1, in_channels, LAYOUT_PROBE_SIZE, LAYOUT_PROBE_SIZE,
                       generator=torch.Generator().manual_seed(0)).contiguous(memory_format=layout)
    return _in_precision(precision, purpose, [model], [image])


def _probe_runner(precision: str, features: Sequence[int], purpose: str) -> Callable[[], None]:
    """A function running one round of the probe blocks in `precision` (channels_last)."""
    if precision == "int8":
        from training.quantize import int8_probe_runner
        return int8_probe_runner(probe_shapes(features))
    import torch
    from network.unet import DoubleConv, fold_batchnorm
    generator = torch.Generator().manual_seed(0)
    blocks, inputs = [], []
    for width, size in probe_shapes(features):
        block = DoubleConv(width, width).to(memory_format=torch.channels_last)
        blocks.append(block.train() if purpose == "train" else fold_batchnorm(block))
        image = torch.rand(1, width, size, size, generator=generator).contiguous(memory_format=torch.channels_last)
        inputs.append(image.requires_grad_(purpose == "train"))
    return _in_precision(precision, purpose, blocks, inputs)


def _in_precision(precision: str, purpose: str, modules: list, inputs: list) -> Callable[[], None]:
    """A function calling each module on its input: forward + backward for training, forward
    under ``inference_mode`` for prediction, autocast to bf16 when `precision` is bf16."""
    import torch
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def run() -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=precision == "bf16"):
            if purpose == "train":
                for module, image in zip(modules, inputs):
                    module(image).float().sum().backward()
            else:
                with torch.inference_mode():
                    for module, image in zip(modules, inputs):
                        module(image)
    return run
