import pytest
import yaml

from edgeprune.profiles.device import DeviceProfileError, device_profiles, load_device_profile


def test_shipped_profiles_load():
    names = device_profiles()
    for expected in ("jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-64gb", "jetson-agx-thor",
                     "rtx-4090", "cpu-generic"):
        assert expected in names
    for name in names:
        profile = load_device_profile(name)
        assert profile.name == name
        assert profile.memory_available_gb <= profile.memory_total_gb
    assert load_device_profile("jetson-orin-nano-8gb-jp5").tensorrt_version == "8.5"
    assert load_device_profile("jetson-orin-nx-16gb").tensorrt_version == "10.3"
    assert load_device_profile("jetson-agx-thor").tensorrt_version == "10.16"


def _write(tmp_path, **changes):
    data = load_device_profile("cpu-generic").to_dict()
    data.update(changes)
    data = {k: v for k, v in data.items() if v != "<drop>"}
    path = tmp_path / "dev.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("changes,match", [
    ({"memory_total_gb": "lots"}, r"field 'memory_total_gb': 'lots', expected a number"),
    ({"memory_available_gb": 30}, r"field 'memory_available_gb': 30 exceeds memory_total_gb=24"),
    ({"precision": "fp64"}, r"field 'precision': 'fp64', expected one of"),
    ({"providers": ["rocm"]}, r"field 'providers'"),
    ({"kind": "phone"}, r"field 'kind'"),
    ({"workspace_mb": -1}, r"field 'workspace_mb'"),
    ({"colour": "green"}, r"field 'colour': unknown field"),
    ({"precision": "<drop>"}, r"field 'precision': missing"),
])
def test_bad_profile_names_the_field(tmp_path, changes, match):
    with pytest.raises(DeviceProfileError, match=match):
        load_device_profile(_write(tmp_path, **changes))


def test_unknown_profile_lists_shipped():
    with pytest.raises(DeviceProfileError, match=r"unknown device profile 'jetson-nano'; shipped: .*cpu-generic"):
        load_device_profile("jetson-nano")
