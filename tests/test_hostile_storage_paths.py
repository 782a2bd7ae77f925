"""A storage that lists a path no file below a location can have ('..' or empty parts: a
legal S3 key 'a/../../x', a hostile server's listing) never gets it copied: joined below
a local destination, it was written outside it."""
from __future__ import annotations

import yaml

from tests.helpers import last_json, run_cli


def test_an_s3_key_that_climbs_out_is_left_out_not_written_above_the_destination(
        s3_bucket, tmp_path):
    client = s3_bucket.server.client()
    client.put_object(Bucket=s3_bucket.bucket, Key="arch/../../../escape-s3", Body=b"planted")
    client.put_object(Bucket=s3_bucket.bucket, Key="arch//empty-part", Body=b"planted")
    client.put_object(Bucket=s3_bucket.bucket, Key="arch/ok", Body=b"ok")
    url = f"{s3_bucket.url}/arch"
    config = tmp_path / "castlib.yaml"
    config.write_text(yaml.safe_dump({"storage": {url: s3_bucket.options}}))
    dst = tmp_path / "a" / "b" / "dst"
    dst.mkdir(parents=True)
    done = run_cli("sync", url, str(dst), "--json", db=f"sqlite:///{tmp_path / 'c.db'}",
                   env={"CASTLIB_CONFIG": str(config)})
    assert "Traceback" not in done.stderr, done.stderr
    # before: 'escape-s3' written three levels up, beside the catalog, exit 0
    assert sorted(p.name for p in tmp_path.rglob("*") if "escape" in p.name) == [], done.stderr
    assert sorted(p.name for p in dst.rglob("*")) == ["ok"], done.stderr
    assert "not a path below the location" in done.stderr
    assert last_json(done.stdout)["copied"] == 1
