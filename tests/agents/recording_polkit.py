"""A polkit authority of our own, for tests that look at exactly what the daemon asks polkit
(see `helpers_auth.RecordingPolkit`).

Run as a script by the test's Python (it needs dbus-fast):

    recording_polkit.py ADDRESS RECORD ANSWERS
        take org.freedesktop.PolicyKit1 on the bus at ADDRESS and print "ready"; append every
        CheckAuthorization call to the file RECORD as one JSON object a line (sender, path,
        subject, action, details, flags, cancellation_id, header_flags) and answer it from
        the JSON file ANSWERS, read again for every call: {ACTION or "*": [authorized,
        challenge] or "error"}; an action it does not list is denied.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

address, record, answers = sys.argv[1:4]


def plain(x: Any) -> Any:
    if isinstance(x, Variant):
        return {"sig": x.signature, "value": plain(x.value)}
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


async def main() -> None:
    bus = await MessageBus(bus_address=address).connect()

    def handler(msg: Message) -> Message | None:
        if (
            msg.message_type is not MessageType.METHOD_CALL
            or msg.interface != "org.freedesktop.PolicyKit1.Authority"
        ):
            return None
        if msg.member != "CheckAuthorization" or msg.signature != "(sa{sv})sa{ss}us":
            return Message.new_error(
                msg, "org.freedesktop.DBus.Error.UnknownMethod", msg.member or ""
            )
        subject, action, details, flags, cancel = msg.body
        with open(record, "a") as f:
            call = {
                "sender": msg.sender,
                "path": msg.path,
                "subject": plain(subject),
                "action": action,
                "details": details,
                "flags": flags,
                "cancellation_id": cancel,
                "header_flags": int(msg.flags),
            }
            f.write(json.dumps(call) + "\n")
        with open(answers) as f:
            table = json.load(f)
        answer = table.get(action, table.get("*", [False, False]))
        if answer == "error":
            return Message.new_error(msg, "org.freedesktop.PolicyKit1.Error.Failed", "told to fail")
        return Message.new_method_return(msg, "(bba{ss})", [[answer[0], answer[1], {}]])

    bus.add_message_handler(handler)
    await bus.request_name("org.freedesktop.PolicyKit1")
    print("ready", flush=True)
    await bus.wait_for_disconnect()


if __name__ == "__main__":
    asyncio.run(main())
