"""The demo's API part (scripts/demo.py --part api, scripts/demo_api.py) runs as the README
says and shows the seed's scene: ``docker run -d`` and ``docker run -it`` through
``pyoverlay serve``, both under the service in ``ps --forest``, and nothing left behind."""

from __future__ import annotations

from helpers import demo, mounts


def test_demo_runs_docker_containers_through_the_service(tmp_path):
    # in a private network namespace: the demo's containers are on the bridge, which (with
    # its firewall table and ip_forward) is then that namespace's, not the machine's
    r = demo.run_part("api", tmp_path, private_net=True)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert "FAILED" not in out, out
    assert "#### Part 5: the docker CLI drives pyoverlay: pyoverlay serve\n" in out, out
    assert "I am pid 1" in out, out
    tree = out.split("On the host: ps -aef --forest")[1].split("The service is the parent")[0]
    lines = tree.split("PID  PPID")[1].splitlines()[1:]  # the rows after ps's header
    lines = [line for line in lines if line.strip()]
    assert "pyoverlay serve" in lines[0], tree  # the service first, everything else below it
    pid1 = [line for line in lines[1:] if line.endswith("<- the container's PID 1")]
    assert len(pid1) == 2 and "httpd -f" in pid1[0] and "\\_ sh " in pid1[1], tree
    assert sum(line.endswith("<- a monitor") for line in lines) == 2, tree
    assert sum(line.endswith("<- its FUSE server") for line in lines) == 2, tree
    assert "docker run -it returned 7" in out, out
    assert "A /etc/motd" in out.split("diff shell")[1], out
    assert "nothing mounted; removed" in out, out
    assert not mounts.mounts_under(tmp_path)
