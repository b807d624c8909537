"""The demo's part 6 (scripts/demo.py --part serve, scripts/demo_serve.py): a busybox httpd
on the bridge with a published port, visited with curl while the live trace shows the
copy-up its CGI causes; the port closes at stop and nothing is left. Run in a private
network namespace, so the bridge, its firewall table and ip_forward are that namespace's
own and the machine's network is not touched."""

from __future__ import annotations

from helpers import demo, mounts


def test_demo_serves_a_published_port_while_traced(tmp_path):
    r = demo.run_part("serve", tmp_path, private_net=True)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert "FAILED" not in out, out
    assert "#### Part 6: a container that serves" in out, out
    assert "<h1>hello from a pyoverlay container</h1>" in out, out
    assert "visit number 1, served by" in out and "visit number 2, served by" in out, out
    live = [line for line in out.splitlines() if line.startswith("  [live trace] ")]
    assert any("copy_up_done" in line and "/www/visits" in line for line in live), out
    assert "C /www/visits" in out, out
    assert "nothing listens on 127.0.0.1:" in out, out
    assert "nothing mounted; removed" in out, out
    assert not mounts.mounts_under(tmp_path)
