"""`qgseg info`: the panel's dependency check and device probe, on the command line."""

from __future__ import annotations

import json

from QGSegmentationLib.cli.main import main
from QGSegmentationLib.slicer import environment as env


def test_info_lists_every_requirement_with_its_floor_and_the_device(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    floors = (("torch", env.TORCH_REQUIREMENT.lstrip(">=")),) + env.REQUIREMENTS
    for name, minimum in floors:
        assert any(line.strip().startswith(f"{name} ") and line.endswith(f"(needs >= {minimum})")
                   for line in out.splitlines()), name
    assert "device: " in out and out.rstrip().endswith("all requirements met")


def test_info_json_names_a_missing_package_and_exits_1(capsys, monkeypatch):
    monkeypatch.setattr(env, "REQUIREMENTS", env.REQUIREMENTS + (("qgseg-no-such-package", "1.0"),))
    assert main(["info", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    missing = [p for p in report["packages"] if not p["ok"]]
    assert [(p["name"], p["installed"]) for p in missing] == [("qgseg-no-such-package", None)]
    assert report["problems"] == ["qgseg-no-such-package not installed (needs >= 1.0)  <- missing"]
    assert report["device"]["torch"] and report["device"]["error"] is None
