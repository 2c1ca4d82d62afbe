"""fleetgate's own: a plain-TCP to mutual-TLS proxy for an MQTT test client
that cannot speak TLS (the suite's). It reads the client's CONNECT, picks
the certificate of the client id it names (CREDS/<id>.crt and .key, or
DEFAULT_ID's for an empty or unknown id; CREDS/ca.crt to trust), and
connects to the broker over TLS with it; then it passes bytes both ways.
usage: tlsproxy.py BROKER_PORT CREDS DEFAULT_ID
It listens on a free port of 127.0.0.1 and prints "ready <port>"."""
import asyncio, os, ssl, sys

broker_port, creds, default_id = int(sys.argv[1]), sys.argv[2], sys.argv[3]

def vbi(buf, i):
    value, mult = 0, 1
    while True:
        b = buf[i]; i += 1
        value += (b & 127) * mult
        if b < 128:
            return value, i
        mult *= 128

async def read_packet(r):
    head = await r.readexactly(2)
    buf = bytearray(head)
    while buf[-1] & 0x80:
        buf += await r.readexactly(1)
    length, i = vbi(bytes(buf), 1)
    buf += await r.readexactly(length)
    return bytes(buf), i

def client_id(pkt, i):
    n = int.from_bytes(pkt[i:i + 2], "big"); i += 2 + n  # protocol name
    version = pkt[i]; i += 1 + 1 + 2  # version, flags, keep-alive
    if version == 5:
        plen, i = vbi(pkt, i); i += plen
    n = int.from_bytes(pkt[i:i + 2], "big")
    return pkt[i + 2:i + 2 + n].decode()

async def pipe(r, w):
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
        pass
    finally:
        try:
            w.close()
        except Exception:
            pass

async def handle(cr, cw):
    try:
        connect, i = await read_packet(cr)
    except (asyncio.IncompleteReadError, ConnectionError):
        cw.close(); return
    cid = client_id(connect, i) or default_id
    if not os.path.exists(os.path.join(creds, cid + ".crt")):
        cid = default_id
    ctx = ssl.create_default_context(cafile=os.path.join(creds, "ca.crt"))
    ctx.check_hostname = False
    ctx.load_cert_chain(os.path.join(creds, cid + ".crt"), os.path.join(creds, cid + ".key"))
    try:
        br, bw = await asyncio.open_connection("127.0.0.1", broker_port, ssl=ctx)
    except (OSError, ssl.SSLError):
        cw.close(); return
    bw.write(connect)
    await bw.drain()
    await asyncio.gather(pipe(cr, bw), pipe(br, cw))

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print("ready", server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()

asyncio.run(main())
