"""A person with an encrypting Matrix client (matrix-nio with its E2E extra), driven by the
Rust tests over stdin/stdout: one JSON command per line in, one JSON answer per line out.

Every answer is {"ok": true, ...} or {"ok": false, "error": "..."}. Messages the client decrypts
(or fails to) are collected across syncs, so a test can count answers (no duplicates).

Commands (field "cmd"):
  login        homeserver, user_id, password, store  -> device_id
  create_room  invite (list), name, direct (bool), encrypted (default true) -> room_id
  wait_joined  room_id, user_id, timeout               -> joined
  send         room_id, body, mentions (list)          -> event_id  (encrypted)
  send_held    room_id, body, mentions                 -> event_id  (encrypted; its room key is held back)
  release_keys room_id                                 -> sent      (sends the held room keys)
  send_file    room_id, name, data (text)              -> event_id  (an encrypted attachment)
  download_file room_id, sender                        -> data_b64, ciphertext_is_plaintext
                                                          (the newest encrypted file from sender,
                                                          downloaded and decrypted)
  session_key  room_id                                 -> session_keys (the room keys shared so far)
  roundtrip    room_id, body, mentions, sender         -> ms        (send, then wait for sender's answer)
  messages     room_id, timeout                        -> messages: [{event_id, sender, body, msgtype, encrypted, decrypted, url?, file?}]
  wait_message room_id, sender, contains, timeout      -> message
  quit
"""

import asyncio
import base64
import json
import sys
import time
import uuid

from nio import (
    AsyncClient,
    AsyncClientConfig,
    MegolmEvent,
    RoomMessageNotice,
    RoomMessageText,
    RoomEncryptedFile,
    UploadResponse,
)
from nio.api import Api
from nio.responses import ShareGroupSessionResponse
from nio.crypto import ENCRYPTION_ENABLED

if not ENCRYPTION_ENABLED:
    raise SystemExit("matrix-nio was installed without its e2e extra: pip install \"matrix-nio[e2e]\"")


class Person:
    def __init__(self):
        self.client = None
        self.messages = {}  # room_id -> list of message dicts, in arrival order
        self.seen = set()
        self.held = {}  # room_id -> list of to-device payloads
        self.shared_keys = {}  # room_id -> room keys shared so far

    def on_event(self, room, event):
        if event.event_id in self.seen:
            return
        self.seen.add(event.event_id)
        entry = {
            "event_id": event.event_id,
            "sender": event.sender,
            "encrypted": bool(getattr(event, "decrypted", False)) or isinstance(event, MegolmEvent),
            "decrypted": not isinstance(event, MegolmEvent),
        }
        if isinstance(event, (RoomMessageText, RoomMessageNotice)):
            entry["body"] = event.body
            entry["msgtype"] = "m.notice" if isinstance(event, RoomMessageNotice) else "m.text"
        elif isinstance(event, RoomEncryptedFile):
            entry["body"] = event.body
            entry["msgtype"] = "m.file"
            entry["url"] = event.url
            entry["file"] = {
                "url": event.url, "key": event.key, "iv": event.iv, "hashes": event.hashes,
            }
        else:
            entry["body"] = None
            entry["msgtype"] = None
        self.messages.setdefault(room.room_id, []).append(entry)

    async def sync(self, timeout_ms=0):
        await self.client.sync(timeout=timeout_ms, full_state=False)
        if self.client.should_upload_keys:
            await self.client.keys_upload()
        if self.client.should_query_keys:
            await self.client.keys_query()
        if self.client.should_claim_keys:
            await self.client.keys_claim(self.client.get_users_for_key_claiming())
        await self.client.send_to_device_messages()

    async def login(self, cmd):
        config = AsyncClientConfig(encryption_enabled=True, store_sync_tokens=True)
        self.client = AsyncClient(
            cmd["homeserver"], cmd["user_id"], store_path=cmd["store"], config=config
        )
        self.client.add_event_callback(
            self.on_event, (RoomMessageText, RoomMessageNotice, MegolmEvent, RoomEncryptedFile)
        )
        answer = await self.client.login(cmd["password"], device_name="e2e test person")
        if not getattr(answer, "access_token", None):
            raise RuntimeError(f"login failed: {answer}")
        await self.sync()
        return {"device_id": self.client.device_id}

    async def create_room(self, cmd):
        encryption = [
            {
                "type": "m.room.encryption",
                "state_key": "",
                "content": {"algorithm": "m.megolm.v1.aes-sha2"},
            }
        ]
        answer = await self.client.room_create(
            name=cmd.get("name"),
            invite=cmd.get("invite", []),
            is_direct=cmd.get("direct", False),
            initial_state=encryption if cmd.get("encrypted", True) else [],
        )
        room_id = getattr(answer, "room_id", None)
        if not room_id:
            raise RuntimeError(f"createRoom failed: {answer}")
        await self.sync()
        return {"room_id": room_id}

    async def wait_joined(self, cmd):
        deadline = time.monotonic() + cmd.get("timeout", 30)
        while time.monotonic() < deadline:
            await self.sync(500)
            room = self.client.rooms.get(cmd["room_id"])
            if room and cmd["user_id"] in room.users:
                return {"joined": True}
        raise RuntimeError(f"{cmd['user_id']} did not join {cmd['room_id']}")

    async def ready_to_send(self, room_id):
        # The room's members and their devices known, Olm sessions to every device claimed.
        await self.sync()
        if not self.client.rooms[room_id].encrypted:
            return
        await self.client.joined_members(room_id)
        # The members' devices are asked for every time: an agent's device is made when the
        # agent is invited, so a first query (made on the invite) may find none, and nio asks
        # again only when it sees a device-list change.
        self.client.olm.users_for_key_query.update(self.client.rooms[room_id].users)
        if self.client.should_query_keys:
            await self.client.keys_query()
        missing = self.client.get_missing_sessions(room_id)
        if missing:
            await self.client.keys_claim(missing)
        if self.client.olm.should_share_group_session(room_id):
            await self.client.share_group_session(room_id, ignore_unverified_devices=True)
            # Exactly what went to the other devices in m.room_key (message index 0).
            session = self.client.olm.outbound_group_sessions[room_id]
            self.shared_keys.setdefault(room_id, []).append(session.session_key)

    def content(self, cmd):
        mentions = cmd.get("mentions", [])
        body = cmd["body"]
        content = {"msgtype": "m.text", "body": body, "m.mentions": {"user_ids": mentions}}
        return content

    async def send(self, cmd):
        await self.ready_to_send(cmd["room_id"])
        answer = await self.client.room_send(
            cmd["room_id"], "m.room.message", self.content(cmd), ignore_unverified_devices=True
        )
        event_id = getattr(answer, "event_id", None)
        if not event_id:
            raise RuntimeError(f"send failed: {answer}")
        return {"event_id": event_id}

    async def send_held(self, cmd):
        room_id = cmd["room_id"]
        await self.ready_to_send(room_id)
        room = self.client.rooms[room_id]
        olm = self.client.olm
        held = []
        for sharing_with, to_device in olm.share_group_session_parallel(
            room_id, list(room.users.keys()), ignore_unverified_devices=True
        ):
            held.append((sharing_with, to_device))
        olm.outbound_group_sessions[room_id].shared = True
        self.held.setdefault(room_id, []).extend(held)
        answer = await self.client.room_send(
            room_id, "m.room.message", self.content(cmd), ignore_unverified_devices=True
        )
        event_id = getattr(answer, "event_id", None)
        if not event_id:
            raise RuntimeError(f"send failed: {answer}")
        return {"event_id": event_id, "held": len(held)}

    async def release_keys(self, cmd):
        sent = 0
        for sharing_with, payload in self.held.pop(cmd["room_id"], []):
            method, path, data = Api.to_device(
                self.client.access_token, "m.room.encrypted", payload, uuid.uuid4()
            )
            answer = await self.client._send(
                ShareGroupSessionResponse,
                method,
                path,
                data,
                response_data=(cmd["room_id"], sharing_with),
            )
            if not isinstance(answer, ShareGroupSessionResponse):
                raise RuntimeError(f"to-device send failed: {answer}")
            sent += 1
        return {"sent": sent}

    async def send_file(self, cmd):
        room_id = cmd["room_id"]
        data = cmd["data"].encode()
        from nio.crypto import encrypt_attachment

        ciphertext, keys = encrypt_attachment(data)
        answer, _ = await self.client.upload(
            lambda *_: ciphertext,
            content_type="application/octet-stream",
            filename=cmd["name"],
            filesize=len(ciphertext),
        )
        if not isinstance(answer, UploadResponse):
            raise RuntimeError(f"upload failed: {answer}")
        content = {
            "msgtype": "m.file",
            "body": cmd["name"],
            "file": {
                "url": answer.content_uri,
                "key": keys["key"],
                "iv": keys["iv"],
                "hashes": keys["hashes"],
                "v": "v2",
                "mimetype": "text/plain",
            },
            "info": {"size": len(data), "mimetype": "text/plain"},
            "m.mentions": {"user_ids": cmd.get("mentions", [])},
        }
        await self.ready_to_send(room_id)
        answer = await self.client.room_send(
            room_id, "m.room.message", content, ignore_unverified_devices=True
        )
        event_id = getattr(answer, "event_id", None)
        if not event_id:
            raise RuntimeError(f"send failed: {answer}")
        return {"event_id": event_id}

    async def download_file(self, cmd):
        # What a person's client does with an encrypted attachment: download the ciphertext
        # (authenticated media) and decrypt it with the key from the event's `file` field.
        import aiohttp
        from nio.crypto import decrypt_attachment

        files = [
            m for m in self.messages.get(cmd["room_id"], [])
            if m["sender"] == cmd["sender"] and m.get("file")
        ]
        if not files:
            raise RuntimeError(f"no encrypted file from {cmd['sender']} in {cmd['room_id']}")
        file = files[-1]["file"]
        server, media_id = file["url"][len("mxc://"):].split("/", 1)
        url = f"{self.client.homeserver}/_matrix/client/v1/media/download/{server}/{media_id}"
        async with aiohttp.ClientSession() as session:
            async with session.get(
                url, headers={"Authorization": f"Bearer {self.client.access_token}"}
            ) as response:
                if response.status != 200:
                    raise RuntimeError(f"download failed: {response.status} {await response.text()}")
                ciphertext = await response.read()
        plaintext = decrypt_attachment(
            ciphertext, file["key"]["k"], file["hashes"]["sha256"], file["iv"]
        )
        return {
            "data_b64": base64.b64encode(plaintext).decode(),
            "ciphertext_is_plaintext": ciphertext == plaintext,
        }

    async def session_key(self, cmd):
        # The room keys the person's client shared in the room, for leak scans.
        keys = self.shared_keys.get(cmd["room_id"], [])
        if not keys:
            raise RuntimeError("no room key shared in the room yet")
        return {"session_keys": keys}

    async def roundtrip(self, cmd):
        # Milliseconds from the message being accepted by the homeserver to the first new
        # message from `sender` seen by this client (decrypted when the room is encrypted).
        room_id = cmd["room_id"]
        await self.ready_to_send(room_id)
        before = len(self.messages.get(room_id, []))
        answer = await self.client.room_send(
            room_id, "m.room.message", self.content(cmd), ignore_unverified_devices=True
        )
        if not getattr(answer, "event_id", None):
            raise RuntimeError(f"send failed: {answer}")
        sent = time.monotonic()
        deadline = sent + cmd.get("timeout", 60)
        while time.monotonic() < deadline:
            await self.client.sync(timeout=1000)
            for message in self.messages.get(room_id, [])[before:]:
                if message["sender"] == cmd["sender"] and message["body"]:
                    return {"ms": (time.monotonic() - sent) * 1000.0}
        raise RuntimeError("no answer within the deadline")

    async def messages_cmd(self, cmd):
        await self.sync(cmd.get("timeout", 0))
        return {"messages": self.messages.get(cmd["room_id"], [])}

    async def wait_message(self, cmd):
        deadline = time.monotonic() + cmd.get("timeout", 30)
        while time.monotonic() < deadline:
            await self.sync(500)
            for message in self.messages.get(cmd["room_id"], []):
                if message["sender"] != cmd["sender"]:
                    continue
                if cmd.get("contains") and cmd["contains"] not in (message["body"] or ""):
                    continue
                if cmd.get("after") and message["event_id"] in cmd["after"]:
                    continue
                return {"message": message}
        raise RuntimeError(
            f"no message from {cmd['sender']} containing {cmd.get('contains')!r}; got "
            f"{self.messages.get(cmd['room_id'], [])}"
        )


async def main():
    person = Person()
    handlers = {
        "login": person.login,
        "create_room": person.create_room,
        "wait_joined": person.wait_joined,
        "send": person.send,
        "send_held": person.send_held,
        "release_keys": person.release_keys,
        "send_file": person.send_file,
        "download_file": person.download_file,
        "messages": person.messages_cmd,
        "session_key": person.session_key,
        "roundtrip": person.roundtrip,
        "wait_message": person.wait_message,
    }
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        try:
            answer = await handlers[cmd["cmd"]](cmd)
            answer["ok"] = True
        except Exception as error:  # every failure goes back to the test, with its reason
            answer = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    if person.client:
        await person.client.close()


asyncio.run(main())
