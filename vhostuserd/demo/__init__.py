"""An embedded demo descriptor set, so the service can be tried on a machine with no backends.

`make_demo_tree(DEST)` writes descriptors under ``DEST/share/qemu/vhost-user`` whose binaries
are small conventions-following backends (`vhostuserd.demo.backend`) run by this Python.
They are named ``90-demo-*.json`` so that real backends (``50-...``) sort first and win.
"""

from __future__ import annotations

import json
import os
import sys

DEMO_TYPES = {
    "gpu": ["render-node", "virgl"],
    "input": ["evdev-path", "no-grab"],
    "block": ["read-only", "blk-file"],
    "fs": ["separate-options"],
}


def make_demo_tree(dest: str) -> str:
    """Write the demo set; returns the data directory to put first in XDG_DATA_DIRS."""
    bindir = os.path.join(dest, "bin")
    vudir = os.path.join(dest, "share", "qemu", "vhost-user")
    os.makedirs(bindir, exist_ok=True)
    os.makedirs(vudir, exist_ok=True)
    for btype in DEMO_TYPES:
        binary = os.path.join(bindir, f"vhostuserd-demo-{btype}")
        script = (
            f"#!{sys.executable}\n"
            "import sys\n"
            "from vhostuserd.demo.backend import main\n"
            f"sys.exit(main({btype!r}))\n"
        )
        tmp = binary + ".tmp"
        with open(tmp, "w") as f:
            f.write(script)
        os.chmod(tmp, 0o755)
        os.replace(tmp, binary)
        descriptor = {
            "description": f"vhostuserd demo {btype} backend (does no real device work)",
            "type": btype,
            "binary": binary,
            "tags": ["demo"],
        }
        with open(os.path.join(vudir, f"90-demo-{btype}.json"), "w") as f:
            json.dump(descriptor, f, indent=2)
            f.write("\n")
    return os.path.join(dest, "share")
