"""training/cpu.py: thread count, OpenMP environment, and the measured precision choice with its cache.

The measurement is replaced by a fake in most tests (no timing is asserted); one test runs the
real probe on tiny widths to check it returns a time for every candidate.
"""

import json
import math

import pytest
import torch

from training import cpu
from training import runtime as train  # select_amp lives in training/runtime.py


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(cpu.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / cpu.CACHE_FILE


class FakeMeasure:
    """Returns fixed seconds per candidate and counts its calls."""

    def __init__(self, seconds):
        self.seconds, self.calls = seconds, 0

    def __call__(self, features, in_channels, purpose, candidates):
        self.calls += 1
        return {name: value for name, value in self.seconds.items() if name.split(" ")[0] in candidates}


def choose(measure, **kwargs):
    lines = []
    arguments = {"features": (8, 16), "purpose": "train", "candidates": ("fp32", "bf16"), **kwargs}
    return cpu.choose_cpu_precision(measure=measure, log=lines.append, **arguments), lines


@pytest.mark.parametrize("seconds, expected", [({"fp32": 0.010, "bf16": 0.025}, "fp32"),
                                               ({"fp32": 0.030, "bf16": 0.012}, "bf16")])
def test_choice_follows_the_faster_measurement(cache, seconds, expected):
    choice, lines = choose(FakeMeasure(seconds))
    assert choice.precision == expected and choice.how == "measured"
    assert choice.dtype == (torch.bfloat16 if expected == "bf16" else None)
    assert len(lines) == 1
    assert f"train): {expected}," in lines[0] and f"fp32 {1000 * seconds['fp32']:.1f} ms" in lines[0]


def test_the_layout_is_chosen_by_the_whole_unet_probe(cache):
    seconds = {"fp32": 0.030, "bf16": 0.020, "bf16 unet": 0.050, "bf16 unet/contiguous": 0.040}
    choice, lines = choose(FakeMeasure(seconds))
    assert (choice.precision, choice.channels_last, choice.dtype) == ("bf16", False, torch.bfloat16)
    assert "channels_last=False" in lines[0] and "bf16 unet/contiguous 40.0 ms" in lines[0]
    cached, _ = choose(FakeMeasure(seconds))
    assert (cached.how, cached.precision, cached.channels_last) == ("cache", "bf16", False)
    within_noise = {**seconds, "bf16 unet/contiguous": 0.048}  # 4% faster: under LAYOUT_MARGIN
    assert choose(FakeMeasure(within_noise), features=(8, 32))[0].channels_last is True
    no_layout_probe = {"fp32": 0.030, "bf16": 0.020}  # e.g. int8 won, or a measurement without it
    assert choose(FakeMeasure(no_layout_probe), features=(8, 64))[0].channels_last is True


def test_int8_can_win_for_prediction(cache):
    choice, _ = choose(FakeMeasure({"fp32": 3.0, "bf16": 2.0, "int8": 1.0}), purpose="predict",
                       candidates=("fp32", "bf16", "int8"))
    assert choice.precision == "int8" and choice.dtype is None


def test_second_call_uses_the_cache(cache):
    measure = FakeMeasure({"fp32": 0.03, "bf16": 0.01})
    first, _ = choose(measure)
    second, lines = choose(measure)
    assert measure.calls == 1
    assert (second.precision, second.how) == ("bf16", "cache")
    assert second.seconds == first.seconds and "cache" in lines[0]
    assert cache.is_file()


@pytest.mark.parametrize("change", [{"features": (8, 32)}, {"purpose": "predict"}, {"in_channels": 3},
                                    {"candidates": ("fp32",)}])
def test_cache_is_ignored_when_the_key_differs(cache, change):
    measure = FakeMeasure({"fp32": 0.03, "bf16": 0.01})
    choose(measure)
    choice, _ = choose(measure, **change)
    assert measure.calls == 2 and choice.how == "measured"
    assert len(json.loads(cache.read_text())) == 2  # both kept


def test_cache_is_ignored_for_another_cpu_or_torch(cache, monkeypatch):
    measure = FakeMeasure({"fp32": 0.03, "bf16": 0.01})
    choose(measure)
    monkeypatch.setattr(cpu, "cpu_model_name", lambda: "Another CPU")
    choose(measure)
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    choose(measure)
    assert measure.calls == 3


GENOA = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n"
         "flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 avx512_vnni\n\n"
         "processor\t: 1\ncpu family\t: 99\nmodel name\t: Other\nflags\t\t: fpu\n")
MILAN = "cpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx fma avx2\n"


@pytest.mark.parametrize("text, name, features", [
    (GENOA, "AMD EPYC (family 25 model 17; avx2 fma avx512f avx512_vnni avx512_bf16)",
     ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"]),  # SPEED_FLAGS order, first processor only
    (MILAN, "AMD EPYC (family 25 model 1; avx2 fma)", ["avx2", "fma"]),
    ("model name\t: Old CPU\nflags\t\t: fpu sse2 avx\n", "Old CPU (no avx2)", []),
])
def test_cpu_name_tells_apart_cpus_that_share_a_model_string(tmp_path, monkeypatch, text, name, features):
    (tmp_path / "cpuinfo").write_text(text)
    monkeypatch.setattr(cpu, "CPUINFO", tmp_path / "cpuinfo")
    assert cpu.cpu_model_name() == name and cpu.cpu_features() == features


def test_cpu_name_without_cpuinfo_falls_back_to_platform(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu, "CPUINFO", tmp_path / "absent")
    monkeypatch.setattr(cpu.platform, "processor", lambda: "arm")
    assert cpu.cpu_model_name() == "arm" and cpu.cpu_features() == []


def test_cache_is_ignored_for_a_cpu_of_the_same_name_with_other_extensions(cache, tmp_path, monkeypatch):
    measure = FakeMeasure({"fp32": 0.03, "bf16": 0.01})
    for text in (GENOA, MILAN, GENOA):
        (tmp_path / "cpuinfo").write_text(text)
        monkeypatch.setattr(cpu, "CPUINFO", tmp_path / "cpuinfo")
        choose(measure)
    assert measure.calls == 2  # the first CPU's choice is cached, the second's measured


@pytest.mark.parametrize("damage", ["{not json", "", "[1, 2]", '{"x": 1}'])
def test_corrupt_cache_is_ignored_and_rewritten(cache, damage):
    measure = FakeMeasure({"fp32": 0.01, "bf16": 0.02})
    choose(measure)
    key = next(iter(json.loads(cache.read_text())))
    text = damage if damage != '{"x": 1}' else json.dumps({key: {"precision": "fp32", "bogus": 1}})
    cache.write_text(text)
    choice, _ = choose(measure)
    assert choice.how == "measured" and measure.calls == 2
    assert json.loads(cache.read_text())[key]["precision"] == "fp32"  # valid again
    assert choose(measure)[0].how == "cache"


def test_cached_choice_outside_the_candidates_is_not_used(cache):
    measure = FakeMeasure({"fp32": 0.01, "bf16": 0.02})
    choose(measure)
    entries = json.loads(cache.read_text())
    for entry in entries.values():
        entry["precision"] = "int8"  # hand-edited to a precision this key never measured
    cache.write_text(json.dumps(entries))
    assert choose(measure)[0].how == "measured"


def test_unwritable_cache_is_not_an_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(cpu.CACHE_ENV, str(blocker / "cache"))  # a folder under a file cannot exist
    measure = FakeMeasure({"fp32": 0.01, "bf16": 0.02})
    assert choose(measure)[0].precision == "fp32"
    assert choose(measure)[0].how == "measured"


def test_cache_folder_order(monkeypatch, tmp_path):
    monkeypatch.delenv(cpu.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cpu.cache_folder() == tmp_path / "xdg" / "abdoseg"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cpu.cache_folder() == tmp_path / "home" / ".cache" / "abdoseg"
    monkeypatch.setenv(cpu.CACHE_ENV, str(tmp_path / "mine"))
    assert cpu.cache_folder() == tmp_path / "mine"


def test_select_amp_forces_and_measures_on_cpu(monkeypatch):
    calls = []

    def fake_choose(features, in_channels, purpose, candidates):
        calls.append((tuple(features), purpose, candidates))
        return cpu.PrecisionChoice("fp32", True, purpose, "measured")

    monkeypatch.setattr(train, "choose_cpu_precision", fake_choose)
    monkeypatch.setattr(cpu, "cpu_has_bf16", lambda: True)
    device = torch.device("cpu")
    assert train.select_amp(device, "bf16") is torch.bfloat16
    assert train.select_amp(device, "off") is None and train.select_amp(device, "fp32") is None
    assert calls == []  # forced: nothing measured
    cfg = train.TrainConfig(features=(8, 16))
    assert train.select_amp(device, "auto", cfg) is None
    assert calls == [((8, 16), "train", ("fp32", "bf16"))]
    monkeypatch.setattr(cpu, "cpu_has_bf16", lambda: False)
    train.select_amp(device, "auto", cfg, purpose="predict")
    assert calls[-1] == ((8, 16), "predict", ("fp32",))


@pytest.mark.parametrize("measured_layout, allowed, expected", [(False, True, False), (True, True, True),
                                                                (True, False, False)])
def test_select_precision_takes_the_measured_layout_only_under_auto(monkeypatch, measured_layout, allowed,
                                                                    expected):
    monkeypatch.setattr(train, "choose_cpu_precision",
                        lambda *a, **k: cpu.PrecisionChoice("bf16", measured_layout, "train", "measured"))
    cpu_device, cfg = torch.device("cpu"), train.TrainConfig(features=(8, 16), channels_last=allowed)
    assert train.select_precision(cpu_device, cfg) == (torch.bfloat16, expected)
    # forced precision: the config's layout as set, nothing measured
    assert train.select_precision(cpu_device, cfg.replace(amp="fp32")) == (None, allowed)


def test_usable_cpu_count_follows_affinity_and_quota(monkeypatch, tmp_path):
    read_quota = cpu.cgroup_cpu_quota
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: {0, 2, 5})
    monkeypatch.setattr(cpu, "cgroup_cpu_quota", lambda: None)
    assert cpu.usable_cpu_count() == 3
    monkeypatch.setattr(cpu, "cgroup_cpu_quota", lambda: 1.5)
    assert cpu.usable_cpu_count() == 2
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")
    assert read_quota(quota) == 1.5
    quota.write_text("max 100000\n")
    assert read_quota(quota) is None
    assert read_quota(tmp_path / "missing") is None


def test_openmp_environment_never_overrides_the_user(monkeypatch):
    monkeypatch.setattr(cpu, "usable_cpu_count", lambda: 3)
    environ = {"OMP_WAIT_POLICY": "ACTIVE"}
    added = cpu.prepare_openmp_environment("passive", environ=environ)
    assert added == {"OMP_NUM_THREADS": "3"}
    assert environ == {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "3"}
    fresh = {}
    assert cpu.prepare_openmp_environment("passive", environ=fresh) == {"OMP_NUM_THREADS": "3",
                                                                          "OMP_WAIT_POLICY": "PASSIVE"}
    assert cpu.prepare_openmp_environment("default", environ={}) == {"OMP_NUM_THREADS": "3"}
    with pytest.raises(ValueError, match="unknown OpenMP policy"):
        cpu.prepare_openmp_environment("fastest", environ={})


def test_probe_shapes_use_the_model_widths():
    # 0.4 GFLOP / (36 * 64^2) -> 52 px, rounded to 56; 512 wide: 6.5 px -> at least 16
    assert cpu.probe_shapes((64, 128, 256, 512)) == [(64, 56), (512, 16)]
    assert cpu.probe_shapes((16, 32, 64, 128)) == [(16, 208), (128, 24)]
    assert cpu.probe_shapes((8,), image_size=40) == [(8, 40)]  # capped at the level's resolution


@pytest.mark.parametrize("purpose", ["train", "predict"])
def test_real_measurement_times_every_candidate(purpose):
    seconds = cpu.measure_candidates((4, 8), 1, purpose, ("fp32", "bf16"), budget_seconds=0.0)
    fastest = min(("fp32", "bf16"), key=seconds.get)
    assert set(seconds) == {"fp32", "bf16", f"{fastest} unet", f"{fastest} unet/contiguous"}
    assert all(0 < value < math.inf for value in seconds.values())
