"""`make test`'s integration lanes (tests/conftest.py): which test files must share a lane."""

from __future__ import annotations

from tests.conftest import lane_groups


def test_files_sharing_a_session_fixture_share_a_lane_transitively() -> None:
    files = {
        "a.py": {"ray_session", "tmp_path"},
        "b.py": {"short_reference_run", "ray_session"},  # joins a (Ray) ...
        "c.py": {"two_node_cluster", "short_reference_run"},  # ... and c joins b: one chain
        "d.py": {"two_node_cluster"},
        "e.py": {"tmp_path", "short_dataset"},  # a cheap session fixture: its own lane unit
        "f.py": set(),
    }
    groups = lane_groups(files)
    assert {groups[f"{f}.py"] for f in "abcd"} == {"a.py"}  # named after its first file
    assert groups["e.py"] == "e.py" and groups["f.py"] == "f.py"


def test_two_chains_stay_apart_until_a_file_links_them() -> None:
    files = {"a.py": {"ray_session"}, "b.py": {"two_node_cluster"}, "c.py": {"ray_session"}}
    assert lane_groups(files) == {"a.py": "a.py", "b.py": "b.py", "c.py": "a.py"}
    files["d.py"] = {"two_node_cluster", "ray_session"}
    assert set(lane_groups(files).values()) == {"a.py"}
