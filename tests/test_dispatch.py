"""Where each stage of a run goes (castlib.dispatch.plan_segments): the host of its local
data, the queue `queues:` maps a remote storage to, else with its neighbour or the default
queue; what no one host can run is refused before anything is sent."""
import pytest

from castlib.config import UserConfig
from castlib.dispatch import DEFAULT_QUEUE, payload_of, plan_segments
from castlib.errors import ConfigError
from castlib.location import parse_location
from castlib.pipeline import Pipeline

EOS = "root://eos.example.org//eos/cdr"
S3 = "s3://bucket/cdr"


def _plan(stages, config=None):
    pipeline = Pipeline.from_stages(stages)
    return [(s.queue, s.positions) for s in
            plan_segments(pipeline, parse_location, config or UserConfig())]


def _sync(ref, dst):
    return [("index", {"location": ref}), ("index", {"location": dst, "missing_ok": True}),
            ("diff", {"id": "plan", "ref": ref, "dst": dst}), ("sync", {"from": "plan"})]


def test_a_sync_goes_to_the_host_of_its_local_side():
    assert _plan(_sync("file://daq01/data", EOS)) == [("daq01", [0, 1, 2, 3])]
    assert _plan(_sync(EOS, "file://daq02/restore")) == [("daq02", [0, 1, 2, 3])]


def test_between_remote_storages_the_configured_queue_else_the_default():
    assert _plan(_sync(S3, EOS)) == [(DEFAULT_QUEUE, [0, 1, 2, 3])]
    config = UserConfig(queues={"root://eos.example.org": "eos"})
    assert _plan(_sync(S3, EOS), config) == [("eos", [0, 1, 2, 3])]


def test_a_pipeline_over_two_hosts_is_cut_where_the_host_changes():
    stages = [("index", {"location": "file://daq02/spare"})] + _sync("file://daq01/data", EOS)
    stages.append(("verify", {"location": "file://daq02/spare"}))
    assert _plan(stages) == [("daq02", [0]), ("daq01", [1, 2, 3, 4]), ("daq02", [5])]


def test_what_no_one_host_can_run_is_refused():
    with pytest.raises(ConfigError, match="reaches the disks of daq01 and daq02"):
        _plan(_sync("file://daq01/data", "file://daq02/data"))


def test_a_result_read_on_another_host_is_refused():
    stages = [("diff", {"id": "d", "ref": "file://daq01/a", "dst": EOS}),
              ("index", {"location": "file://daq02/b"}),
              ("report", {"from": "d"})]
    with pytest.raises(ConfigError, match="reads the result of d, which runs on daq01"):
        _plan(stages + [("verify", {"location": "file://daq02/b"})])


def test_a_path_typed_on_the_client_is_the_clients(monkeypatch, tmp_path):
    monkeypatch.setenv("CASTLIB_HOSTNAME", "client")
    pipeline = Pipeline.from_stages([("index", {"location": str(tmp_path)}),
                                     ("index", {"location": "cdr"})])
    payload = payload_of(pipeline, UserConfig(locations={"cdr": "/data/cdr"}), str(tmp_path))
    assert payload["stages"][0][1]["location"] == f"file://client{tmp_path}"
    assert payload["stages"][1][1]["location"] == "cdr"
    assert payload["locations"] == {"cdr": "file://client/data/cdr"}


def test_a_report_file_relative_to_the_pipeline_stays_so_on_a_worker(tmp_path):
    """`out:` is relative to the pipeline file; a worker runs in a folder of its own (a
    service's, often /): sent as typed, the report landed there, on the worker's host."""
    source = tmp_path / "p.yaml"
    source.write_text(f"""
locations: {{cdr: "file://daq01/data"}}
stages:
  - diff: {{id: d, ref: cdr, dst: "{EOS}"}}
  - report: {{from: d, out: reports/pending.json}}
  - report: {{from: d, out: "-"}}
  - report: {{from: d, out: /srv/abs.json}}
""")
    pipeline = Pipeline.from_file(str(source), UserConfig())
    stages = payload_of(pipeline, UserConfig(), str(tmp_path))["stages"]
    assert stages[1][1]["out"] == str(tmp_path / "reports" / "pending.json")
    assert stages[2][1].get("out", "-") == "-"
    assert stages[3][1]["out"] == "/srv/abs.json"
