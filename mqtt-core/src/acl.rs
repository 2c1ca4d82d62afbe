//! Who may use which topics, and the few MQTT byte checks fleetgate makes
//! before rumqttd's codec sees a packet. Sans-IO: strings and bytes in,
//! decisions out.
//!
//! - role `device`: publish and subscribe under `devices/<own id>/` only
//!   (and `devices/<own id>` itself); no wildcard that reaches further, no
//!   `$SYS`, no shared subscriptions.
//! - role `service`: subscribe to anything under `devices/` (`devices/#`,
//!   `devices/+/telemetry`, shared subscriptions of those); publish only
//!   commands, `devices/<id>/commands/...`.
//! - role `admin`: not an MQTT identity.
//! - role `claim`: may only publish a CSR to `$fleetgate/provision/<request-id>`
//!   (answered by the session itself on `.../accepted` or `.../rejected`) and
//!   subscribe under `$fleetgate/provision/`.

use provisioning::{Identity, Role};

/// Why a topic or filter was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied(pub String);

impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The topic rules for one connected identity.
#[derive(Debug, Clone)]
pub struct Acl {
    role: Role,
    /// `devices/<id>`
    own: String,
}

const DEVICES: &str = "devices/";
/// Where claims ask for certificates.
pub const PROVISION: &str = "$fleetgate/provision/";

/// The request id of a provisioning topic `$fleetgate/provision/<request-id>`
/// (one level, id characters only).
pub fn provision_request(topic: &str) -> Option<&str> {
    let id = topic.strip_prefix(PROVISION)?;
    provisioning::DeviceId::try_new(id).is_ok().then_some(id)
}

impl Acl {
    pub fn new(identity: &Identity) -> Self {
        Self {
            role: identity.role,
            own: format!("{DEVICES}{}", identity.id),
        }
    }

    fn is_own(&self, topic: &str) -> bool {
        topic == self.own
            || topic
                .strip_prefix(self.own.as_str())
                .is_some_and(|rest| rest.starts_with('/'))
    }

    /// May this identity publish to `topic`?
    pub fn can_publish(&self, topic: &str) -> Result<(), Denied> {
        if topic.is_empty() {
            return Err(Denied(
                "empty topic (topic aliases are not accepted)".into(),
            ));
        }
        if topic.contains(['+', '#', '\0']) {
            return Err(Denied(format!(
                "topic {topic:?} has wildcard or NUL characters"
            )));
        }
        let ok = match self.role {
            Role::Device => self.is_own(topic),
            Role::Service => is_command_topic(topic),
            Role::Admin | Role::Node => false,
            Role::Claim => {
                return Err(Denied(format!(
                    "a claim may only publish a CSR to {PROVISION}<request-id>, not to {topic:?}"
                )))
            }
        };
        if ok {
            Ok(())
        } else {
            Err(Denied(format!(
                "{} may not publish to {topic:?}",
                self.role
            )))
        }
    }

    /// May this identity subscribe to `filter`?
    pub fn can_subscribe(&self, filter: &str) -> Result<(), Denied> {
        let deny = |why: &str| Err(Denied(format!("filter {filter:?}: {why}")));
        if filter.is_empty() || filter.contains('\0') {
            return deny("empty or has NUL");
        }
        let inner = match filter.strip_prefix("$share/") {
            Some(rest) => {
                if self.role != Role::Service {
                    return deny("shared subscriptions are for services");
                }
                match rest.split_once('/') {
                    Some((group, f)) if !group.is_empty() && !group.contains(['+', '#']) => f,
                    _ => return deny("malformed shared subscription"),
                }
            }
            None => filter,
        };
        if !valid_filter(inner) {
            return deny("not a valid MQTT filter");
        }
        match self.role {
            // A literal prefix: a wildcard can only appear below our own level.
            Role::Device if self.is_own(inner) => Ok(()),
            Role::Device => deny(&format!(
                "a device may only subscribe under its own topics, {}/",
                self.own
            )),
            Role::Service if inner.starts_with(DEVICES) => Ok(()),
            Role::Service => deny("services may subscribe under devices/ only"),
            Role::Admin | Role::Node => deny("admin and node certificates are not MQTT identities"),
            Role::Claim if inner.starts_with(PROVISION) => Ok(()),
            Role::Claim => deny("a claim may only subscribe under $fleetgate/provision/"),
        }
    }
}

/// `devices/<id>/commands` or below, with a valid id level.
fn is_command_topic(topic: &str) -> bool {
    let Some(rest) = topic.strip_prefix(DEVICES) else {
        return false;
    };
    let mut levels = rest.split('/');
    let id_ok = levels
        .next()
        .is_some_and(|id| provisioning::DeviceId::try_new(id).is_ok());
    id_ok && levels.next() == Some("commands")
}

/// The device a service's command topic (`devices/<id>/commands/...`) is for.
pub fn command_target(topic: &str) -> Option<provisioning::DeviceId> {
    if !is_command_topic(topic) {
        return None;
    }
    let id = topic.strip_prefix(DEVICES)?.split('/').next()?;
    provisioning::DeviceId::try_new(id).ok()
}

/// What is wrong with a PUBLISH's (or will's) topic name, if anything,
/// as MQTT 5 reason code and text: not UTF-8 or with U+0000 (MQTT 1.5.4:
/// malformed), or with a wildcard (MQTT 4.7.1: topic name invalid). An
/// empty topic is the caller's business (a topic alias may fill it).
pub fn topic_name_problem(topic: &[u8]) -> Option<(TopicProblem, String)> {
    let Ok(t) = std::str::from_utf8(topic) else {
        return Some((
            TopicProblem::Malformed,
            "the topic is not valid UTF-8".into(),
        ));
    };
    if t.contains('\0') {
        return Some((TopicProblem::Malformed, "the topic contains U+0000".into()));
    }
    if t.contains(['+', '#']) {
        return Some((
            TopicProblem::Invalid,
            format!("the topic name {t:?} contains a wildcard"),
        ));
    }
    None
}

/// Which refusal a bad topic name gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicProblem {
    /// MQTT 5 0x81.
    Malformed,
    /// MQTT 5 0x90.
    Invalid,
}

/// Whether `topic` matches the (valid) filter `filter` (MQTT 4.7; a topic
/// starting with `$` matches no filter starting with a wildcard).
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    // Most filters a topic meets differ from it in their literal start
    // (a device's commands against its telemetry): the bytes before the
    // filter's first wildcard must be the topic's, as far as it goes.
    let (f, t) = (filter.as_bytes(), topic.as_bytes());
    let literal = f
        .iter()
        .position(|&b| b == b'+' || b == b'#')
        .unwrap_or(f.len());
    if literal == f.len() {
        return f == t;
    }
    let n = literal.min(t.len());
    f[..n] == t[..n] && matches_by_levels(filter, topic)
}

/// MQTT 4.7's matching, level by level: what [`topic_matches`] answers,
/// without its shortcut.
fn matches_by_levels(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let (mut f, mut t) = (filter.split('/'), topic.split('/'));
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// MQTT 4.7: `#` only as a whole last level, `+` only as a whole level.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    levels.iter().enumerate().all(|(i, l)| match *l {
        "#" => i == levels.len() - 1,
        "+" => true,
        other => !other.contains(['#', '+']),
    })
}

/// What the first bytes of a connection say about its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectSniff {
    /// Not enough bytes yet.
    Incomplete,
    /// An MQTT CONNECT with this protocol level (4 = 3.1.1, 5 = 5.0).
    Level(u8),
    /// Not an MQTT CONNECT.
    NotConnect(&'static str),
}

/// Reads the protocol level of a CONNECT at the start of `buf` without
/// consuming it, so the right codec can decode the whole packet.
pub fn sniff_connect(buf: &[u8]) -> ConnectSniff {
    let Some(&first) = buf.first() else {
        return ConnectSniff::Incomplete;
    };
    if first != 0x10 {
        return ConnectSniff::NotConnect("first packet is not CONNECT");
    }
    // Remaining length: 1 to 4 bytes, 7 bits each.
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else {
            return ConnectSniff::Incomplete;
        };
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return ConnectSniff::NotConnect("malformed remaining length");
        }
    }
    // Protocol name: length 4, "MQTT" (3.1's "MQIsdp" is not supported).
    let Some(name) = buf.get(i..i + 6) else {
        return ConnectSniff::Incomplete;
    };
    if name != b"\x00\x04MQTT" {
        return ConnectSniff::NotConnect("protocol name is not MQTT");
    }
    match buf.get(i + 6) {
        None => ConnectSniff::Incomplete,
        Some(&level @ (4 | 5)) => ConnectSniff::Level(level),
        Some(_) => ConnectSniff::NotConnect("unsupported protocol level (MQTT 3.1.1 and 5 only)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_are_checked_as_mqtt_says() {
        assert_eq!(topic_name_problem(b"devices/d/t"), None);
        assert_eq!(
            topic_name_problem(b"devices/d/\xc3\x28").map(|p| p.0),
            Some(TopicProblem::Malformed)
        );
        assert_eq!(
            topic_name_problem(b"devices/d/\0").map(|p| p.0),
            Some(TopicProblem::Malformed)
        );
        assert_eq!(
            topic_name_problem(b"devices/d/+").map(|p| p.0),
            Some(TopicProblem::Invalid)
        );
        assert_eq!(
            topic_name_problem(b"devices/#").map(|p| p.0),
            Some(TopicProblem::Invalid)
        );
    }

    #[test]
    fn filters_match_as_mqtt_says() {
        for (f, t, want) in [
            ("devices/d/commands/#", "devices/d/commands/reboot", true),
            ("devices/d/commands/#", "devices/d/commands", true),
            ("devices/d/#", "devices/d", true),
            ("devices/d/commands/+", "devices/d/commands/a/b", false),
            ("devices/d/+/x", "devices/d/commands/x", true),
            ("devices/d/commands", "devices/d/commands/x", false),
            ("devices/d/commands/x", "devices/d/commands/x", true),
            ("devices/d/commands/+", "devices/d/commands/", true),
            ("#", "$fleetgate/x", false),
        ] {
            assert_eq!(topic_matches(f, t), want, "{f} {t}");
        }
        assert_eq!(
            command_target("devices/d-1/commands/x").map(|d| d.to_string()),
            Some("d-1".into())
        );
        assert_eq!(command_target("devices/d-1/telemetry"), None);
    }

    #[test]
    fn the_fast_match_agrees_with_matching_level_by_level() {
        let levels = ["", "a", "b", "ab", "+", "#", "$s", "d-1"];
        let mut names = vec![String::new()];
        for _ in 0..3 {
            let mut longer = Vec::new();
            for n in &names {
                for l in levels {
                    longer.push(if n.is_empty() {
                        l.to_owned()
                    } else {
                        format!("{n}/{l}")
                    });
                }
            }
            names.extend(longer);
        }
        names.sort();
        names.dedup();
        let mut checked = 0;
        for f in &names {
            for t in names.iter().filter(|t| !t.contains(['+', '#'])) {
                assert_eq!(topic_matches(f, t), matches_by_levels(f, t), "{f:?} {t:?}");
                checked += 1;
            }
        }
        assert!(checked > 100_000, "{checked}");
    }
    use provisioning::DeviceId;

    fn acl(role: Role, id: &str) -> Acl {
        Acl::new(&Identity {
            role,
            id: DeviceId::try_new(id).unwrap(),
        })
    }

    #[test]
    fn device_topics() {
        let a = acl(Role::Device, "dev-1");
        for (topic, ok) in [
            ("devices/dev-1/telemetry", true),
            ("devices/dev-1", true),
            ("devices/dev-1/a/b/c", true),
            ("devices/dev-10/telemetry", false),
            ("devices/dev-2/telemetry", false),
            ("devices/dev-1x", false),
            ("$SYS/broker", false),
            ("devices", false),
            ("", false),
            ("devices/dev-1/+", false),
        ] {
            assert_eq!(a.can_publish(topic).is_ok(), ok, "publish {topic}");
        }
        for (filter, ok) in [
            ("devices/dev-1/#", true),
            ("devices/dev-1/commands/+", true),
            ("devices/dev-1", true),
            ("#", false),
            ("+/dev-1/#", false),
            ("devices/+/telemetry", false),
            ("devices/#", false),
            ("devices/dev-2/#", false),
            ("$SYS/#", false),
            ("$share/g/devices/dev-1/#", false),
            ("devices/dev-1/#/x", false),
            ("devices/dev-1/a#", false),
        ] {
            assert_eq!(a.can_subscribe(filter).is_ok(), ok, "subscribe {filter}");
        }
    }

    #[test]
    fn claim_topics() {
        let c = acl(Role::Claim, "line-3");
        // A claim publishes nothing through the ACL: the session takes its
        // provisioning requests before the ACL is asked.
        for topic in ["devices/line-3/telemetry", "$fleetgate/provision/x", "a"] {
            assert!(c.can_publish(topic).is_err(), "publish {topic}");
        }
        for (filter, ok) in [
            ("$fleetgate/provision/+/+", true),
            ("$fleetgate/provision/req-1/accepted", true),
            ("$fleetgate/provision/#", true),
            ("$fleetgate/#", false),
            ("devices/#", false),
            ("#", false),
        ] {
            assert_eq!(c.can_subscribe(filter).is_ok(), ok, "subscribe {filter}");
        }
        for (topic, req) in [
            ("$fleetgate/provision/req-1", Some("req-1")),
            ("$fleetgate/provision/req-1/accepted", None),
            ("$fleetgate/provision/", None),
            ("$fleetgate/provision/a b", None),
            ("$fleetgate/provisionx/req", None),
        ] {
            assert_eq!(provision_request(topic), req, "{topic}");
        }
    }

    #[test]
    fn service_topics() {
        let s = acl(Role::Service, "backend");
        for (filter, ok) in [
            ("devices/+/telemetry", true),
            ("devices/#", true),
            ("$share/workers/devices/+/telemetry", true),
            ("#", false),
            ("$SYS/#", false),
            ("+/x", false),
            ("$share//devices/#", false),
            ("$share/g/#", false),
        ] {
            assert_eq!(s.can_subscribe(filter).is_ok(), ok, "subscribe {filter}");
        }
        for (topic, ok) in [
            ("devices/dev-1/commands/reboot", true),
            ("devices/dev-1/commands", true),
            ("devices/dev-1/telemetry", false),
            ("devices//commands/x", false),
            ("other/dev-1/commands", false),
        ] {
            assert_eq!(s.can_publish(topic).is_ok(), ok, "publish {topic}");
        }
    }

    #[test]
    fn admins_get_nothing() {
        let a = acl(Role::Admin, "admin");
        assert!(a.can_publish("devices/admin/x").is_err());
        assert!(a.can_subscribe("devices/#").is_err());
    }

    #[test]
    fn sniffing_connect() {
        // MQTT 3.1.1 CONNECT, client id "a".
        let v4 = [
            0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 1, b'a',
        ];
        assert_eq!(sniff_connect(&v4), ConnectSniff::Level(4));
        for cut in 0..9 {
            assert_eq!(
                sniff_connect(&v4[..cut]),
                ConnectSniff::Incomplete,
                "cut {cut}"
            );
        }
        let mut v5 = v4;
        v5[8] = 5;
        assert_eq!(sniff_connect(&v5), ConnectSniff::Level(5));
        let mut v3 = v4;
        v3[8] = 3;
        assert!(matches!(sniff_connect(&v3), ConnectSniff::NotConnect(_)));
        assert!(matches!(
            sniff_connect(b"GET / HTTP/1.1\r\n"),
            ConnectSniff::NotConnect(_)
        ));
        assert!(matches!(
            sniff_connect(&[0x10, 0xff, 0xff, 0xff, 0xff, 0x01]),
            ConnectSniff::NotConnect(_)
        ));
        assert!(matches!(
            sniff_connect(&[0x10, 6, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p']),
            ConnectSniff::NotConnect(_)
        ));
    }

    #[test]
    fn wildcards_stand_only_as_whole_levels() {
        for (f, ok) in [
            ("devices/d/#", true),
            ("#", true),
            ("+", true),
            ("devices/+/telemetry", true),
            ("devices/d/#/x", false),
            ("devices/d#", false),
            ("devices/d+/x", false),
            ("", false),
            ("devices//x", true),
        ] {
            assert_eq!(valid_filter(f), ok, "{f}");
        }
    }

    #[test]
    fn a_command_topic_names_a_valid_device_under_commands() {
        let id = |t: &str| command_target(t).map(|d| d.to_string());
        assert_eq!(
            id("devices/dev-1/commands/reboot").as_deref(),
            Some("dev-1")
        );
        assert_eq!(id("devices/dev-1/commands").as_deref(), Some("dev-1"));
        assert_eq!(id("devices/dev-1/telemetry"), None);
        assert_eq!(id("devices/bad id/commands/x"), None);
        assert_eq!(id("devices//commands/x"), None);
        assert_eq!(id("other/dev-1/commands/x"), None);
    }
}
