"""A multi-node Ray on this machine in its own process (``ray.cluster_utils.Cluster``): a 0-CPU head, as KubeRay
recommends, and worker nodes of their own raylet and object store each. Its own process, because ``Cluster`` resets
process-wide Ray state when it shuts down, which would break the test session's own Ray.

Protocol: one JSON line per event on stdout. At start: {"address", "nodes": [raylet pid, ...]}. Commands on stdin:
``remove PID`` (the node whose raylet has that pid, lost without a graceful stop), ``add`` (a fresh node, as an
autoscaler replaces a lost one), ``stop``. Each answers {"nodes": [...]}.

    python -m tests.cluster_proc --nodes 2 --cpus 2
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--gcs-port", type=int, required=True)
    parser.add_argument("--dashboard-port", type=int, required=True)
    args = parser.parse_args()

    from ray.cluster_utils import Cluster

    head = {"num_cpus": 0, "gcs_server_port": args.gcs_port, "dashboard_port": args.dashboard_port}
    head["resources"] = {"tune_driver": 2}  # a study's trial drivers run on the head, as the study manifests declare
    cluster = Cluster(initialize_head=True, head_node_args={**head, "include_dashboard": True})
    node_args = {"num_cpus": args.cpus, "object_store_memory": 200 * 1024**2}
    for _ in range(args.nodes):
        cluster.add_node(**node_args)
    cluster.wait_for_nodes()

    def raylet_pid(node) -> int:
        return node.all_processes["raylet"][0].process.pid

    def say(**event) -> None:
        print(json.dumps({**event, "nodes": [raylet_pid(n) for n in cluster.worker_nodes]}), flush=True)

    say(address=cluster.address)
    for line in sys.stdin:
        command, *rest = line.split()
        if command == "remove":
            node = next(n for n in cluster.worker_nodes if raylet_pid(n) == int(rest[0]))
            cluster.remove_node(node, allow_graceful=False)
        elif command == "add":
            cluster.add_node(**node_args)
            cluster.wait_for_nodes()
        elif command == "stop":
            break
        say()
    cluster.shutdown()
    say(stopped=True)


if __name__ == "__main__":
    main()
