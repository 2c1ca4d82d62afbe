"""fleetgate's MQTT conformance suite, driven with paho-mqtt 2 (and the
mosquitto clients where a new user would reach for them).

Each class is one group of checks from the conformance issue; the Rust test
`tests/tests/conformance.rs` runs each group against its own server. The
checks are those of an interoperability suite adapted to fleetgate's model:
the certificate is the identity, a device uses only `devices/<id>/...`, a
service reads devices' topics and sends them commands under
`devices/<id>/commands/...`.

Time: where the protocol is about time (expiry, will delay), the checks use
the shortest intervals the protocol allows (1-2 s) and assert order of
events, never speed.
"""

import json
import os
import subprocess
import tempfile
import time
import unittest

from fg import (
    CA, HOST, PORT, QUIET, WAIT, Client, PacketTypes, connack_max_packet, connect_packet,
    fleetgate,
    enroll, metric, new_device, prop, props, publish_packet, read_all, read_packet,
    service, tls_socket,
)


def both(f):
    """Runs a check for MQTT 3.1.1 and for MQTT 5."""
    def run(self):
        for v5 in (False, True):
            with self.subTest(mqtt="5" if v5 else "3.1.1"):
                try:
                    f(self, v5)
                finally:
                    # paho reconnects a client that lost its connection:
                    # one variant's clients must not take over the next's.
                    self.tearDown()
                    self.clients = []
    run.__name__ = f.__name__
    run.__doc__ = f.__doc__
    return run


class Case(unittest.TestCase):
    def setUp(self):
        self.clients = []

    def tearDown(self):
        for c in self.clients:
            c.close()

    def client(self, ident, **kw):
        c = Client(ident, **kw)
        self.clients.append(c)
        return c

    def device(self, v5=True, tag="d", **connect):
        """A new device, connected."""
        c = self.client(new_device(tag), v5=v5)
        c.connect(**connect)
        return c

    def service(self, v5=True, **kw):
        c = service(v5=v5, **kw)
        self.clients.append(c)
        return c


class TestIdentity(Case):
    """The certificate is the identity (README: where fleetgate departs
    from the letter of MQTT)."""

    def test_an_empty_client_id_takes_the_device_id(self):
        ident = new_device()
        d = self.client(ident, client_id="")
        _, _, p = d.connect()
        self.assertEqual(prop(p, "AssignedClientIdentifier"), ident)
        d.subscribe(f"devices/{ident}/t", qos=1)
        d.publish(f"devices/{ident}/t", b"mine", qos=1)
        self.assertEqual(d.expect(1)[0].payload, b"mine")

    def test_an_empty_client_id_on_3_1_1(self):
        ident = new_device()
        d = self.client(ident, v5=False, client_id="")
        d.connect()
        d.subscribe(f"devices/{ident}/t", qos=1)
        d.publish(f"devices/{ident}/t", b"mine", qos=1)
        self.assertEqual(d.expect(1)[0].payload, b"mine")

    @both
    def test_another_client_id_is_refused(self, v5):
        ident = new_device()
        d = self.client(ident, v5=v5, client_id=ident + "-other")
        _, rc, _ = d.connect(expect_ok=False)
        self.assertTrue(rc.is_failure, rc)

    def test_a_second_connection_takes_over(self):
        ident = new_device()
        first = self.client(ident)
        first.connect()
        second = Client(ident)
        second.connect()
        self.clients.append(second)
        rc, _ = first.expect_disconnect()
        self.assertEqual(rc.value, 0x8E)
        first.close()


class TestQoS(Case):
    """Delivery at min(published QoS, granted QoS) (MQTT 3.1.1 3.8.4,
    MQTT 5 3.8.4)."""

    @both
    def test_own_subscription_gets_min_qos(self, v5):
        d = self.device(v5)
        rcs, _ = d.subscribe(f"devices/{d.ident}/t", qos=2)
        for qos in (0, 1, 2):
            d.publish(f"devices/{d.ident}/t", f"q{qos}".encode(), qos=qos)
        got = d.expect(3)
        self.assertEqual([(m.payload, m.qos) for m in got],
                         [(b"q0", 0), (b"q1", 1), (b"q2", 2)])

    @both
    def test_lower_granted_qos_caps_delivery(self, v5):
        d = self.device(v5)
        d.subscribe(f"devices/{d.ident}/t", qos=0)
        d.publish(f"devices/{d.ident}/t", b"two", qos=2)
        self.assertEqual(d.expect(1)[0].qos, 0)

    @both
    def test_service_gets_min_qos(self, v5):
        svc = self.service(v5)
        d = self.device(v5)
        svc.subscribe(f"devices/{d.ident}/#", qos=2)
        for qos in (0, 1, 2):
            d.publish(f"devices/{d.ident}/t", f"q{qos}".encode(), qos=qos)
        got = svc.expect(3)
        self.assertEqual(sorted((m.payload, m.qos) for m in got),
                         [(b"q0", 0), (b"q1", 1), (b"q2", 2)])

    @both
    def test_command_gets_min_qos(self, v5):
        svc = self.service(v5)
        d = self.device(v5)
        d.subscribe(f"devices/{d.ident}/commands/#", qos=2)
        for qos in (0, 1):
            svc.publish(f"devices/{d.ident}/commands/c", f"q{qos}".encode(), qos=qos)
        got = d.expect(2)
        self.assertEqual([(m.payload, m.qos) for m in got], [(b"q0", 0), (b"q1", 1)])

    @both
    def test_retained_message_at_min_qos(self, v5):
        d = self.device(v5)
        topic = f"devices/{d.ident}/state"
        d.publish(topic, b"on", qos=1, retain=True)
        svc = self.service(v5)
        svc.subscribe(topic, qos=2)
        m = svc.expect(1)[0]
        self.assertEqual((m.payload, m.qos, m.retain), (b"on", 1, True))
        # The device's own later subscription gets its retained message too.
        d.subscribe(f"devices/{d.ident}/#", qos=2)
        m = d.expect(1)[0]
        self.assertEqual((m.topic, m.payload, m.qos, m.retain), (topic, b"on", 1, True))
        # An empty retained message clears it.
        d.publish(topic, b"", qos=1, retain=True)
        d.expect(1)
        d.unsubscribe(f"devices/{d.ident}/#")
        d.subscribe(f"devices/{d.ident}/#", qos=2)
        self.assertIsNone(d.quiet())


class TestTopicAliases(Case):
    """MQTT 5 3.3.2.3.4: topic aliases from the client are honoured up to
    the Topic Alias Maximum the CONNACK advertises."""

    def test_connack_advertises_a_topic_alias_maximum(self):
        d = self.client(new_device())
        _, _, p = d.connect()
        self.assertGreaterEqual(prop(p, "TopicAliasMaximum", 0), 1)

    def test_aliases_are_resolved(self):
        d = self.client(new_device())
        _, _, p = d.connect()
        top = prop(p, "TopicAliasMaximum")
        svc = self.service()
        svc.subscribe(f"devices/{d.ident}/#", qos=1)
        d.subscribe(f"devices/{d.ident}/#", qos=1)
        a, b = f"devices/{d.ident}/a", f"devices/{d.ident}/b"
        d.publish(a, b"1", qos=1, TopicAlias=1)
        d.publish("", b"2", qos=1, TopicAlias=1)
        d.publish(b, b"3", qos=1, TopicAlias=top)
        d.publish(a, b"4", qos=1, TopicAlias=1)
        d.publish("", b"5", qos=1, TopicAlias=top)
        expect = [(a, b"1"), (a, b"2"), (b, b"3"), (a, b"4"), (b, b"5")]
        for c in (d, svc):
            got = c.expect(5)
            self.assertEqual([(m.topic, m.payload) for m in got], expect)
            # The alias is the sender's business: none reaches a subscriber.
            self.assertEqual([prop(m, "TopicAlias") for m in got], [None] * 5)

    def test_an_alias_over_the_maximum_is_refused(self):
        d = self.client(new_device())
        _, _, p = d.connect()
        d.publish(f"devices/{d.ident}/a", b"x", qos=0, TopicAlias=prop(p, "TopicAliasMaximum") + 1)
        rc, _ = d.expect_disconnect()
        self.assertEqual(rc.value, 0x94)

    def test_an_unknown_alias_is_a_protocol_error(self):
        d = self.client(new_device())
        d.connect()
        d.publish("", b"x", qos=0, TopicAlias=3)
        rc, _ = d.expect_disconnect()
        self.assertEqual(rc.value, 0x82)

    def test_autoassigned_aliases_from_a_sender_that_reuses_them(self):
        """A client that numbers its topics itself (as MQTT.js's
        autoAssignTopicAlias does): every message arrives."""
        d = self.client(new_device())
        d.connect()
        svc = self.service()
        svc.subscribe(f"devices/{d.ident}/#")
        topics = [f"devices/{d.ident}/t{i}" for i in range(3)]
        seen = {}
        for round_ in range(2):
            for t in topics:
                if t in seen:
                    d.publish("", f"{round_}".encode(), qos=1, TopicAlias=seen[t])
                else:
                    seen[t] = len(seen) + 1
                    d.publish(t, f"{round_}".encode(), qos=1, TopicAlias=seen[t])
        got = [(m.topic, m.payload) for m in svc.expect(6)]
        self.assertEqual(got, [(t, str(r).encode()) for r in range(2) for t in topics])


class TestSessions(Case):
    """Session state and expiry (MQTT 5 3.1.2.11.2, 4.1; 3.1.1 3.1.2.4)."""

    def test_expiry_zero_ends_the_session_at_disconnect(self):
        ident = new_device()
        d = self.client(ident)
        d.connect(clean_start=False, SessionExpiryInterval=0)
        d.subscribe(f"devices/{ident}/commands/#", qos=1)
        d.disconnect()
        d2 = self.client(ident)
        present, _, _ = d2.connect(clean_start=False)
        self.assertFalse(present)

    def test_a_short_expiry_ends_the_session(self):
        ident = new_device()
        d = self.client(ident)
        d.connect(clean_start=False, SessionExpiryInterval=1)
        d.subscribe(f"devices/{ident}/commands/#", qos=1)
        d.disconnect()
        time.sleep(2.5)
        d2 = self.client(ident)
        present, _, _ = d2.connect(clean_start=False, SessionExpiryInterval=60)
        self.assertFalse(present)

    @both
    def test_offline_messages_arrive_on_reconnect(self, v5):
        ident = new_device()
        d = self.client(ident, v5=v5, clean=False)
        extra = {"SessionExpiryInterval": 60} if v5 else {}
        d.connect(clean_start=False, **extra)
        d.subscribe(f"devices/{ident}/commands/#", qos=1)
        d.disconnect()
        svc = self.service(v5)
        for i in range(3):
            svc.publish(f"devices/{ident}/commands/c", f"m{i}".encode(), qos=1)
        d2 = self.client(ident, v5=v5, clean=False)
        present, _, _ = d2.connect(clean_start=False, **extra)
        self.assertTrue(present)
        got = d2.expect(3)
        self.assertEqual([(m.payload, m.qos) for m in got], [(b"m0", 1), (b"m1", 1), (b"m2", 1)])

    def test_clean_start_discards_the_session(self):
        ident = new_device()
        d = self.client(ident)
        d.connect(clean_start=False, SessionExpiryInterval=60)
        d.subscribe(f"devices/{ident}/commands/#", qos=1)
        d.disconnect()
        d2 = self.client(ident)
        present, _, _ = d2.connect(clean_start=True, SessionExpiryInterval=60)
        self.assertFalse(present)
        svc = self.service()
        rc, _ = svc.publish(f"devices/{ident}/commands/c", b"x", qos=1)
        self.assertEqual(rc.value, 0x10, "no subscriber is left")

    def test_message_expiry_drops_aged_messages(self):
        ident = new_device()
        d = self.client(ident)
        d.connect(clean_start=False, SessionExpiryInterval=60)
        d.subscribe(f"devices/{ident}/commands/#", qos=1)
        d.disconnect()
        svc = self.service()
        svc.publish(f"devices/{ident}/commands/c", b"short", qos=1, MessageExpiryInterval=1)
        svc.publish(f"devices/{ident}/commands/c", b"long", qos=1, MessageExpiryInterval=600)
        time.sleep(2.2)
        d2 = self.client(ident)
        d2.connect(clean_start=False, SessionExpiryInterval=60)
        m = d2.expect(1)[0]
        self.assertEqual(m.payload, b"long")
        left = prop(m, "MessageExpiryInterval")
        self.assertTrue(left is not None and 0 < left < 600, left)
        self.assertIsNone(d2.quiet())

    @both
    def test_a_service_gets_what_came_while_it_was_away(self, v5):
        extra = {"SessionExpiryInterval": 60} if v5 else {}
        svc = self.client(SERVICE_ALT, v5=v5, role="service", clean=False)
        svc.connect(clean_start=True, **extra)
        svc.subscribe("devices/+/away", qos=1)
        svc.disconnect()
        d = self.device(v5)
        for i in range(3):
            expiry = {"MessageExpiryInterval": 1 if i == 0 else 600} if v5 else {}
            d.publish(f"devices/{d.ident}/away", f"m{i}".encode(), qos=1, **expiry)
        time.sleep(2.2)
        svc2 = self.client(SERVICE_ALT, v5=v5, role="service", clean=False)
        present, _, _ = svc2.connect(clean_start=False, **extra)
        self.assertTrue(present)
        want = [b"m1", b"m2"] if v5 else [b"m0", b"m1", b"m2"]
        got = svc2.expect(len(want))
        self.assertEqual([(m.payload, m.qos) for m in got], [(w, 1) for w in want])
        self.assertIsNone(svc2.quiet())
        svc2.disconnect()
        # Clean up: the next check starts this service afresh.
        svc3 = self.client(SERVICE_ALT, v5=v5, role="service", clean=True)
        svc3.connect()
        svc3.disconnect()

    def test_a_service_session_with_expiry_zero_ends_at_disconnect(self):
        svc = self.client(SERVICE_ALT, role="service")
        svc.connect(clean_start=False, SessionExpiryInterval=0)
        svc.subscribe("devices/+/x", qos=1)
        svc.disconnect()
        svc2 = self.client(SERVICE_ALT, role="service")
        present, _, _ = svc2.connect(clean_start=False)
        self.assertFalse(present)

    def test_a_service_session_expires(self):
        svc = self.client(SERVICE_ALT, role="service")
        svc.connect(clean_start=False, SessionExpiryInterval=1)
        svc.subscribe("devices/+/x", qos=1)
        svc.disconnect()
        time.sleep(2.5)
        svc2 = self.client(SERVICE_ALT, role="service")
        present, _, _ = svc2.connect(clean_start=False, SessionExpiryInterval=30)
        self.assertFalse(present)
        svc2.disconnect()
        # Kept within its expiry.
        svc3 = self.client(SERVICE_ALT, role="service")
        present, _, _ = svc3.connect(clean_start=False, SessionExpiryInterval=30)
        self.assertTrue(present)


SERVICE_ALT = "conformance-svc2"


class TestSubscriptionOptions(Case):
    """MQTT 5 3.8.3.1 subscription options, subscription identifiers
    (3.8.2.1.2) and overlapping subscriptions (3.3.4)."""

    def test_no_local(self):
        d = self.device()
        t = f"devices/{d.ident}/t"
        d.subscribe(t, qos=1, noLocal=True)
        d.publish(t, b"own", qos=1)
        self.assertIsNone(d.quiet())
        d.subscribe(t, qos=1, noLocal=False)
        d.publish(t, b"own", qos=1)
        self.assertEqual(d.expect(1)[0].payload, b"own")

    def test_retain_as_published(self):
        d = self.device()
        t = f"devices/{d.ident}/t"
        d.subscribe(t, qos=1, retainAsPublished=True)
        d.publish(t, b"r", qos=1, retain=True)
        self.assertTrue(d.expect(1)[0].retain)
        d.subscribe(t, qos=1, retainAsPublished=False, retainHandling=2)
        d.publish(t, b"r2", qos=1, retain=True)
        self.assertFalse(d.expect(1)[0].retain)

    def test_retain_handling(self):
        d = self.device()
        t = f"devices/{d.ident}/t"
        d.publish(t, b"kept", qos=1, retain=True)
        # 0: on every SUBSCRIBE.
        for _ in range(2):
            d.subscribe(t, qos=1, retainHandling=0)
            m = d.expect(1)[0]
            self.assertEqual((m.payload, m.retain), (b"kept", True))
        # 1: only when the subscription is new.
        d.subscribe(t, qos=1, retainHandling=1)
        self.assertIsNone(d.quiet())
        d.unsubscribe(t)
        d.subscribe(t, qos=1, retainHandling=1)
        self.assertEqual(d.expect(1)[0].payload, b"kept")
        # 2: never.
        d.unsubscribe(t)
        d.subscribe(t, qos=1, retainHandling=2)
        self.assertIsNone(d.quiet())

    def test_retain_handling_for_a_service(self):
        d = self.device()
        t = f"devices/{d.ident}/state"
        d.publish(t, b"kept", qos=1, retain=True)
        svc = self.service()
        for _ in range(2):
            svc.subscribe(t, qos=1, retainHandling=0)
            m = svc.expect(1)[0]
            self.assertEqual((m.payload, m.retain), (b"kept", True))
        svc.subscribe(t, qos=1, retainHandling=1)
        self.assertIsNone(svc.quiet())
        svc.unsubscribe(t)
        svc.subscribe(t, qos=1, retainHandling=2)
        self.assertIsNone(svc.quiet())
        # A filter across devices finds it too, with the sender's identity.
        svc.subscribe("devices/+/state", qos=1)
        got = []
        while (m := svc.quiet(2 * QUIET)) is not None:
            got.append(m)
        mine = [m for m in got if m.topic == t]
        self.assertEqual(len(mine), 1, [m.topic for m in got])
        self.assertTrue(mine[0].retain)
        self.assertIn(("x-fleetgate-device-id", d.ident), prop(mine[0], "UserProperty", []))

    def test_retain_as_published_for_a_service(self):
        d = self.device()
        t = f"devices/{d.ident}/state"
        svc = self.service()
        svc.subscribe(t, qos=1, retainAsPublished=True)
        d.publish(t, b"r1", qos=1, retain=True)
        self.assertTrue(svc.expect(1)[0].retain)
        svc.subscribe(t, qos=1, retainAsPublished=False, retainHandling=2)
        d.publish(t, b"r2", qos=1, retain=True)
        self.assertFalse(svc.expect(1)[0].retain)

    def test_no_retained_messages_for_a_shared_subscription(self):
        d = self.device()
        t = f"devices/{d.ident}/state"
        d.publish(t, b"kept", qos=1, retain=True)
        svc = self.service()
        svc.subscribe(f"$share/g/{t}", qos=1)
        self.assertIsNone(svc.quiet())
        d.publish(t, b"live", qos=1)
        self.assertEqual(svc.expect(1)[0].payload, b"live")

    def test_one_unsubscribe_for_a_group_and_filters_answers_each_in_order(self):
        # A session held outside the router answers its own filters, and
        # the router its group's: one reason per filter, in order (the
        # router's UNSUBACK had the group's reason alone).
        svc = self.service()
        rcs, _ = svc.subscribe_many([("devices/+/state", 1), ("$share/g/devices/+/state", 1)])
        self.assertTrue(all(r.value < 0x80 for r in rcs), rcs)
        rcs, _ = svc.unsubscribe(["devices/+/none", "$share/g/devices/+/state", "devices/+/state"])
        self.assertEqual([r.value for r in rcs], [0x11, 0x00, 0x00])

    def test_subscription_identifiers(self):
        d = self.device()
        base = f"devices/{d.ident}"
        d.subscribe(f"{base}/a/#", qos=1,
                    properties=props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=7))
        d.publish(f"{base}/a/x", b"1", qos=1)
        self.assertEqual(prop(d.expect(1)[0], "SubscriptionIdentifier"), [7])
        d.subscribe(f"{base}/+/x", qos=0,
                    properties=props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=9))
        d.publish(f"{base}/a/x", b"2", qos=1)
        m = d.expect(1)[0]
        self.assertEqual(sorted(prop(m, "SubscriptionIdentifier")), [7, 9])
        self.assertIsNone(d.quiet(), "one copy for overlapping subscriptions")

    def test_subscription_identifiers_reach_a_service(self):
        svc = self.service()
        d = self.device()
        svc.subscribe(f"devices/{d.ident}/#", qos=1,
                      properties=props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=42))
        d.publish(f"devices/{d.ident}/t", b"x", qos=1)
        self.assertEqual(prop(svc.expect(1)[0], "SubscriptionIdentifier"), [42])

    @both
    def test_overlapping_subscriptions_deliver_once_at_the_highest_qos(self, v5):
        d = self.device(v5)
        base = f"devices/{d.ident}"
        d.subscribe(f"{base}/#", qos=0)
        d.subscribe(f"{base}/x", qos=2)
        d.publish(f"{base}/x", b"o", qos=2)
        m = d.expect(1)[0]
        self.assertEqual(m.qos, 2)
        self.assertIsNone(d.quiet())

    def test_retained_messages_on_every_subscribe_3_1_1(self):
        d = self.device(v5=False)
        t = f"devices/{d.ident}/t"
        d.publish(t, b"kept", qos=1, retain=True)
        for _ in range(2):
            d.subscribe(t, qos=1)
            self.assertEqual(d.expect(1)[0].payload, b"kept")


class TestFlowControl(Case):
    """Receive Maximum (MQTT 5 3.3.4), Maximum Packet Size (3.1.2.11.4,
    3.2.2.3.6) and the server's message size limit."""

    def test_receive_maximum(self):
        ident = new_device()
        d = self.client(ident)
        d.connect(clean_start=False, SessionExpiryInterval=60)
        d.subscribe(f"devices/{ident}/commands/#", qos=1)
        d.disconnect()
        svc = self.service()
        for i in range(5):
            svc.publish(f"devices/{ident}/commands/c", f"m{i}".encode(), qos=1)
        d2 = self.client(ident, manual_ack=True)
        d2.connect(clean_start=False, SessionExpiryInterval=60, ReceiveMaximum=2)
        first = d2.expect(2)
        self.assertIsNone(d2.quiet(), "a third message while two are unacknowledged")
        got = [m.payload for m in first]
        for m in first:
            d2.ack(m)
        while len(got) < 5:
            m = d2.expect(1)[0]
            got.append(m.payload)
            d2.ack(m)
        self.assertEqual(got, [f"m{i}".encode() for i in range(5)])

    def test_client_maximum_packet_size(self):
        ident = new_device()
        d = self.client(ident)
        d.connect(clean_start=False, SessionExpiryInterval=60, MaximumPacketSize=256)
        d.subscribe(f"devices/{ident}/commands/#", qos=1)
        svc = self.service()
        svc.publish(f"devices/{ident}/commands/c", b"x" * 1000, qos=1)
        svc.publish(f"devices/{ident}/commands/c", b"small", qos=1)
        self.assertEqual(d.expect(1)[0].payload, b"small")
        self.assertIsNone(d.quiet())
        # The one too large was dropped as if delivered, not kept queued.
        shown = json.loads(fleetgate("device", "show", ident, "--json"))
        self.assertEqual(shown["queued_commands"], 0)

    def test_connack_advertises_the_maximum_packet_size(self):
        d = self.client(new_device())
        _, _, p = d.connect()
        self.assertGreaterEqual(prop(p, "MaximumPacketSize", 0), 256 * 1024 + 1024)

    @both
    def test_a_256_kib_payload_goes_through_mosquitto_pub(self, v5):
        ident = new_device()
        svc = self.service(v5)
        svc.subscribe(f"devices/{ident}/big", qos=1)
        cert, key = enroll("device", ident)
        with tempfile.NamedTemporaryFile() as f:
            f.write(os.urandom(256 * 1024))
            f.flush()
            out = subprocess.run(
                ["mosquitto_pub", "-h", HOST, "-p", str(PORT), "--cafile", CA,
                 "--cert", cert, "--key", key, "-V", "mqttv5" if v5 else "mqttv311",
                 "-q", "1", "-t", f"devices/{ident}/big", "-f", f.name],
                capture_output=True, text=True, timeout=WAIT)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(len(svc.expect(1)[0].payload), 256 * 1024)

    @both
    def test_a_publish_over_the_limit_is_refused(self, v5):
        # Raw bytes: paho itself will not send a packet over the limit the
        # server advertised.
        ident = new_device()
        s = tls_socket(ident)
        s.sendall(connect_packet(ident, v5))
        first, body = read_packet(s)
        self.assertEqual((first, body[1]), (0x20, 0))
        limit = connack_max_packet(body) if v5 else 256 * 1024 + 8 * 1024
        self.assertIsNotNone(limit)
        before = metric("fleetgate_refusals_total")
        big = publish_packet(f"devices/{ident}/big".encode(), b"x" * limit, v5)
        self.assertGreater(len(big), limit)
        try:
            s.sendall(big)
        except OSError:
            pass  # closed while sending: what the server should do
        got = read_all(s)
        if v5:
            self.assertEqual([(f, b[0]) for f, b in got], [(0xE0, 0x95)])
        else:
            self.assertEqual(got, [])
        self.assertGreater(metric("fleetgate_refusals_total"), before)


class TestWills(Case):
    """Last will (MQTT 3.1.2.5; MQTT 5 3.1.3.2 will properties and delay)."""

    def will_client(self, v5=True, **will):
        ident = new_device()
        d = self.client(ident, v5=v5)
        d.will(f"devices/{ident}/will", **will)
        return d

    @both
    def test_will_keeps_its_qos_and_retain(self, v5):
        svc = self.service(v5)
        for qos in (0, 1):
            d = self.will_client(v5, payload=b"bye", qos=qos, retain=True)
            svc.subscribe(f"devices/{d.ident}/will", qos=2)
            d.connect()
            d.drop()
            m = svc.expect(1)[0]
            self.assertEqual((m.payload, m.qos), (b"bye", qos))
            # Retained: a later subscriber gets it.
            svc.unsubscribe(f"devices/{d.ident}/will")
            svc.subscribe(f"devices/{d.ident}/will", qos=2)
            m = svc.expect(1)[0]
            self.assertEqual((m.payload, m.qos, m.retain), (b"bye", qos, True))

    @both
    def test_no_will_after_disconnect(self, v5):
        svc = self.service(v5)
        d = self.will_client(v5)
        svc.subscribe(f"devices/{d.ident}/will")
        d.connect()
        d.disconnect()
        self.assertIsNone(svc.quiet())

    def test_will_properties_are_kept(self):
        svc = self.service()
        d = self.will_client(payload=b"{}", qos=1, UserProperty=[("k", "v")],
                             ContentType="application/json", PayloadFormatIndicator=1)
        svc.subscribe(f"devices/{d.ident}/will", qos=1)
        d.connect()
        d.drop()
        m = svc.expect(1)[0]
        self.assertIn(("k", "v"), prop(m, "UserProperty", []))
        self.assertEqual(prop(m, "ContentType"), "application/json")
        self.assertEqual(prop(m, "PayloadFormatIndicator"), 1)

    def test_will_delay_is_honoured(self):
        svc = self.service()
        d = self.will_client(qos=1, WillDelayInterval=2)
        svc.subscribe(f"devices/{d.ident}/will", qos=1)
        d.connect(SessionExpiryInterval=30)
        dropped = time.monotonic()
        d.drop()
        svc.expect(1, timeout=WAIT + 2)
        self.assertGreaterEqual(time.monotonic() - dropped, 2.0)

    def test_reconnect_within_the_delay_cancels_the_will(self):
        svc = self.service()
        d = self.will_client(qos=1, WillDelayInterval=2)
        svc.subscribe(f"devices/{d.ident}/will", qos=1)
        d.connect(SessionExpiryInterval=30)
        d.drop()
        d2 = self.client(d.ident)
        d2.connect(clean_start=False, SessionExpiryInterval=30)
        d2.disconnect()
        self.assertIsNone(svc.quiet(3.5))

    def test_will_goes_when_the_session_ends_before_the_delay(self):
        """MQTT 5 3.1.3.2.2: sent at the delay or the session's end,
        whichever is first; session expiry 0 ends it at once."""
        svc = self.service()
        d = self.will_client(qos=1, WillDelayInterval=600)
        svc.subscribe(f"devices/{d.ident}/will", qos=1)
        d.connect(SessionExpiryInterval=0)
        d.drop()
        svc.expect(1)

    @both
    def test_a_will_topic_that_is_not_utf8_is_refused(self, v5):
        ident = new_device()
        s = tls_socket(ident)
        s.sendall(connect_packet(ident, v5, will_topic=f"devices/{ident}/\xff".encode("latin-1")))
        got = read_all(s)
        # Nothing but (on MQTT 5) a refusing CONNACK, then the close.
        for first, body in got:
            self.assertEqual(first, 0x20, got)
            self.assertGreaterEqual(body[1], 0x80, got)


class TestReasonStrings(Case):
    """MQTT 5 reason strings on refusals, when the client allows problem
    information (3.1.2.11.7)."""

    def test_suback_refusal_says_why(self):
        d = self.device()
        rcs, p = d.subscribe("devices/someone-else/#", qos=1)
        self.assertEqual(rcs[0].value, 0x87)
        self.assertIn(d.ident, prop(p, "ReasonString", ""))

    def test_no_reason_string_when_problem_information_is_off(self):
        d = self.device(RequestProblemInformation=0)
        rcs, p = d.subscribe("devices/someone-else/#", qos=1)
        self.assertEqual(rcs[0].value, 0x87)
        self.assertIsNone(prop(p, "ReasonString"))

    def test_disconnect_says_why(self):
        d = self.device()
        d.publish("devices/someone-else/t", b"x", qos=0)
        rc, p = d.expect_disconnect()
        self.assertEqual(rc.value, 0x87)
        self.assertIn("devices/someone-else/t", prop(p, "ReasonString", ""))

    def test_revocation_says_why(self):
        d = self.device()
        fleetgate("device", "revoke", d.ident, "--reason", "key-compromise")
        rc, p = d.expect_disconnect()
        self.assertEqual(rc.value, 0x98)
        self.assertIn("revoked", prop(p, "ReasonString", ""))

    def test_connack_refusal_says_why(self):
        ident = new_device()
        d = self.client(ident, client_id="not-" + ident)
        _, rc, p = d.connect(expect_ok=False)
        self.assertEqual(rc.value, 0x87)
        self.assertIn(ident, prop(p, "ReasonString", ""))


class TestProtocolErrors(Case):
    """Malformed input gets the spec's refusal (MQTT 1.5.4-1, 4.13)."""

    @both
    def test_ocsp_request_at_qos_2(self, v5):
        d = self.device(v5)
        cert, _ = enroll("device", d.ident)
        # The chain file: the device's certificate, then its issuing CA.
        pems = open(cert).read().split("-----END CERTIFICATE-----")
        with tempfile.TemporaryDirectory() as tmp:
            issuer, req = os.path.join(tmp, "issuer.crt"), os.path.join(tmp, "req.der")
            with open(issuer, "w") as f:
                f.write(pems[1].strip() + "\n-----END CERTIFICATE-----\n")
            subprocess.run(["openssl", "ocsp", "-issuer", issuer, "-cert", cert, "-reqout", req,
                            "-no_nonce"], check=True, capture_output=True)
            with open(req, "rb") as f:
                der = f.read()
        d.subscribe(f"devices/{d.ident}/ocsp/response", qos=1)
        rc, _ = d.publish(f"devices/{d.ident}/ocsp/request", der, qos=2)
        self.assertFalse(rc.is_failure)
        answer = d.expect(1)[0].payload
        with tempfile.TemporaryDirectory() as tmp:
            resp = os.path.join(tmp, "resp.der")
            with open(resp, "wb") as f:
                f.write(answer)
            out = subprocess.run(["openssl", "ocsp", "-respin", resp, "-resp_text", "-noverify"],
                                 capture_output=True, text=True)
        self.assertIn("Cert Status: good", out.stdout, out.stdout + out.stderr)

    @both
    def test_a_topic_that_is_not_utf8_is_refused(self, v5):
        ident = new_device()
        s = tls_socket(ident)
        s.sendall(connect_packet(ident, v5))
        first, _ = read_packet(s)
        self.assertEqual(first, 0x20)
        s.sendall(publish_packet(f"devices/{ident}/".encode() + b"\xc3\x28", b"x", v5))
        got = read_all(s)
        if v5:
            self.assertEqual(got, [(0xE0, got[0][1])], got)
            self.assertEqual(got[0][1][0], 0x81)
        else:
            self.assertEqual(got, [])

    def test_a_wildcard_topic_name_is_refused(self):
        ident = new_device()
        s = tls_socket(ident)
        s.sendall(connect_packet(ident, True))
        read_packet(s)
        s.sendall(publish_packet(f"devices/{ident}/+".encode(), b"x", True))
        got = read_all(s)
        self.assertEqual([(f, b[0]) for f, b in got], [(0xE0, 0x90)])


class TestLimits(Case):
    """One device's load stays its own: subscriptions per session and new
    topics per device are capped (server started with
    --max-subscriptions 20 --new-topics-per-minute 30); what a session
    leaves is freed."""

    MAX_SUBS = 20
    NEW_TOPICS = 30

    @both
    def test_subscriptions_per_session_are_capped(self, v5):
        d = self.device(v5)
        base = f"devices/{d.ident}"
        before = metric("fleetgate_refusals_total")
        rcs, _ = d.subscribe_many([(f"{base}/s{i}", 1) for i in range(self.MAX_SUBS)])
        self.assertTrue(all(not rc.is_failure for rc in rcs), rcs)
        rcs, p = d.subscribe(f"{base}/one-more", qos=1)
        self.assertEqual(rcs[0].value, 0x97 if v5 else 0x80)
        if v5:
            self.assertIn(str(self.MAX_SUBS), prop(p, "ReasonString", ""))
        self.assertGreater(metric("fleetgate_refusals_total"), before)
        # Replacing one is not a new one; after an UNSUBSCRIBE there is room.
        rcs, _ = d.subscribe(f"{base}/s0", qos=0)
        self.assertFalse(rcs[0].is_failure)
        d.unsubscribe(f"{base}/s1")
        rcs, _ = d.subscribe(f"{base}/one-more", qos=1)
        self.assertFalse(rcs[0].is_failure)

    def test_a_clean_session_leaves_nothing(self):
        ident = new_device()
        d = self.client(ident)
        d.connect()
        d.subscribe_many([(f"devices/{ident}/s{i}", 1) for i in range(self.MAX_SUBS)])
        d.disconnect()
        d2 = self.client(ident)
        d2.connect()
        d2.publish(f"devices/{ident}/s3", b"x", qos=1)
        self.assertIsNone(d2.quiet())
        rcs, _ = d2.subscribe_many([(f"devices/{ident}/n{i}", 1) for i in range(self.MAX_SUBS)])
        self.assertTrue(all(not rc.is_failure for rc in rcs), rcs)

    @both
    def test_new_topics_per_device_are_capped(self, v5):
        svc = self.service(v5)
        d = self.device(v5)
        svc.subscribe(f"devices/{d.ident}/#", qos=1)
        before = metric("fleetgate_refusals_total")
        codes = []
        for i in range(self.NEW_TOPICS + 5):
            rc, _ = d.publish(f"devices/{d.ident}/t{i}", b"x", qos=1)
            codes.append(rc.value)
        got = svc.expect(self.NEW_TOPICS)
        self.assertEqual(len({m.topic for m in got}), self.NEW_TOPICS)
        self.assertIsNone(svc.quiet(), "a topic over the cap went through")
        if v5:
            self.assertEqual(codes[: self.NEW_TOPICS], [0] * self.NEW_TOPICS)
            self.assertEqual(codes[self.NEW_TOPICS:], [0x97] * 5)
        self.assertGreaterEqual(metric("fleetgate_refusals_total") - before, 5)
        # Topics already in use still work.
        d.publish(f"devices/{d.ident}/t0", b"again", qos=1)
        self.assertEqual(svc.expect(1)[0].payload, b"again")


if __name__ == "__main__":
    unittest.main()
