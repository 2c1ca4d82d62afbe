//! Paging a long range of keys without etcd counting it whole each time.
//!
//! etcd (3.4, and 3.5 alike) answers a range request by walking every key
//! of the request's range in its index, whatever the limit, to fill in
//! `count`; a sorted request (newest first) reads every value of the
//! range from disk before it truncates to the limit. Paged naively, a
//! scan of n keys costs n²/page: with two million keys, a read-ahead of
//! minutes and a seconds-long newest page of the audit log.
//!
//! So a long range is read through windows: each request's range ends
//! (or, newest first, starts) at a bound chosen to hold about a page of
//! keys, from the density the last answer showed (`count` over the
//! window's width). Keys are placed on a line by their first 16 bytes
//! after the prefix the range's ends share; the windows tile the range
//! exactly, one's end the next one's start, so no key is passed over or
//! read twice however wrong a guess is; a guess only costs a request.
//!
//! A pure state machine: [`Pager::ask`] says which request to make,
//! [`Pager::answer`] takes etcd's answer and returns the entries it gives,
//! in the scan's order. The store does the I/O.

/// Key and value.
pub(crate) type Kv = (Vec<u8>, Vec<u8>);

/// A range whose first answer counts more than this many pages goes on
/// through windows; a shorter one pages on as it is.
const WINDOWED: i64 = 4;

/// A window holding nothing grows this many times over.
const EMPTY_GROWTH: u128 = 16;

/// A window holding keys grows at most this many times over.
const GROWTH: f64 = 16.0;

/// One range request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ask {
    pub key: Vec<u8>,
    pub range_end: Vec<u8>,
    pub limit: i64,
    /// Sorted by key, last first (etcd then reads the range's every value).
    pub descend: bool,
}

/// Where a scan stands.
#[derive(Debug)]
pub(crate) struct Pager {
    /// Keys still to read: `[lo, hi)`.
    lo: Vec<u8>,
    hi: Vec<u8>,
    rev: bool,
    /// Keys per request.
    limit: i64,
    /// What the last page's first and last keys shared: where keys are
    /// dense, positions are taken after it (keys alike in more than 16
    /// bytes would all have one place on a line from the range's ends).
    near: Vec<u8>,
    /// The window's width, and the length of the prefix it is measured
    /// after, once the range proved long; `None`: the whole remaining
    /// range.
    width: Option<(u128, usize)>,
    /// Newest first: a key with keys still to read between it and `hi`
    /// (a window then reaches at most halfway down to it).
    floor: Option<Vec<u8>>,
    /// Newest first: the window is too dense to narrow; read sorted.
    dense: bool,
    /// Newest first: where the next window starts, known exactly (a key
    /// with a page of keys from it to `hi`).
    pin: Option<Vec<u8>>,
    /// Newest first: the range's first page, read by the first request
    /// and given out last.
    lowest: Vec<Kv>,
    /// In key order, from a key (`ladder`): the length of its prefix the
    /// window covers the rest of; shorter each time it holds less than a
    /// page.
    climb: Option<usize>,
    ladder: Vec<u8>,
    /// In key order: where the first window ends (just past the end of
    /// the first page a scan of this range read before).
    first_page_end: Option<Vec<u8>>,
    /// The request made, the prefix and the width its window was
    /// measured in.
    asked: Option<(Ask, Vec<u8>, u128)>,
    done: bool,
}

/// Where `key` lies on the line after `base` (which it starts with).
fn pos(base: &[u8], key: &[u8]) -> u128 {
    let mut b = [0u8; 16];
    let rest = key.get(base.len()..).unwrap_or_default();
    let n = rest.len().min(16);
    b[..n].copy_from_slice(&rest[..n]);
    u128::from_be_bytes(b)
}

/// The key at `at` on the line after `base`.
fn key_at(base: &[u8], at: u128) -> Vec<u8> {
    [base, &at.to_be_bytes()[..]].concat()
}

fn shared(a: &[u8], b: &[u8]) -> Vec<u8> {
    a.iter()
        .zip(b)
        .take_while(|(x, y)| x == y)
        .map(|(x, _)| *x)
        .collect()
}

/// A width measured after a prefix `from` bytes long, measured after one
/// `to` bytes long (a byte longer: 256 times the width).
fn rescale(width: u128, from: usize, to: usize) -> u128 {
    let bits = 8 * from.abs_diff(to);
    let w = if to >= from {
        match u32::try_from(bits).ok().and_then(|b| 1u128.checked_shl(b)) {
            Some(m) => width.saturating_mul(m),
            None => u128::MAX,
        }
    } else {
        u32::try_from(bits)
            .ok()
            .and_then(|b| width.checked_shr(b))
            .unwrap_or(0)
    };
    w.max(1)
}

impl Pager {
    /// A scan of `[from, end)` (`end` `[0]`: to the end of the keyspace),
    /// in key order or (`rev`) the reverse, `limit` keys per request.
    pub fn new(from: Vec<u8>, end: Vec<u8>, rev: bool, limit: i64) -> Self {
        let done = end <= from && end != [0];
        Pager {
            near: shared(&from, &end),
            lo: from,
            hi: end,
            rev,
            limit,
            width: None,
            floor: None,
            dense: false,
            pin: None,
            lowest: Vec::new(),
            first_page_end: None,
            climb: None,
            ladder: Vec::new(),
            asked: None,
            done,
        }
    }

    /// Newest first from `end`, a bound near the keys (a cursor, the
    /// last number given out): windows widen from the narrowest, so the
    /// newest page costs about a page however long the range.
    pub fn newest_below(from: Vec<u8>, end: Vec<u8>, limit: i64) -> Self {
        let mut p = Pager::new(from, end, true, limit);
        if p.placed() {
            p.width = Some((1, p.near.len()));
        }
        p
    }

    /// In key order from `from`, a key near the keys (a cursor), or from
    /// `from` up to and then on from `page_end`, the last key of the
    /// first page a scan of the range read before: windows widen from
    /// the narrowest, so a page costs about a page however long the
    /// range. Without either, the first request would cover the whole
    /// range: where the keys are is not known.
    pub fn oldest_from(from: Vec<u8>, end: Vec<u8>, page_end: Option<Vec<u8>>, limit: i64) -> Self {
        let mut p = Pager::new(from, end, false, limit);
        if p.placed() {
            p.climb_from_lo();
            p.first_page_end = page_end
                .map(|mut k| {
                    k.push(0);
                    k
                })
                .filter(|f| *f > p.lo && *f < p.hi);
        }
        p
    }

    /// Windows from `lo`, a key: first the keys that start with it, then
    /// those that start with it less its last byte, and so on, each
    /// stretch widening from there, so the keys next to it, however
    /// alike, are found in a few requests.
    fn climb_from_lo(&mut self) {
        self.ladder = self.lo.clone();
        self.climb = Some(self.lo.len());
        self.width = Some((1, self.lo.len()));
    }

    /// Whether the range proved long: the first answer counted more than
    /// a few pages (then the scan went on through windows).
    pub fn long(&self) -> bool {
        self.width.is_some()
    }

    /// Ends the scan (after an error).
    pub fn stop(&mut self) {
        self.done = true;
    }

    /// Keys per request from now on.
    pub fn set_limit(&mut self, limit: i64) {
        self.limit = limit;
    }

    /// Whether keys can be placed on a line: not in a range open at its
    /// end (then requests cover the whole remaining range).
    fn placed(&self) -> bool {
        self.hi != [0]
    }

    /// The next request, or `None` when the scan is done.
    pub fn ask(&mut self) -> Option<Ask> {
        if self.done {
            return None;
        }
        let (key, range_end, base, width) = match self.width {
            None => (self.lo.clone(), self.hi.clone(), Vec::new(), 0),
            Some((w, _)) if self.climb.is_some() => {
                let n = self.climb.unwrap_or(0);
                let end = provisioning::store::prefix_end(&self.ladder[..n])
                    .filter(|e| *e < self.hi)
                    .unwrap_or_else(|| self.hi.clone());
                let end = self.first_page_end.clone().unwrap_or(end);
                (self.lo.clone(), end, Vec::new(), w)
            }
            Some((w, len)) if !self.rev => {
                // Measured after what the last page's keys shared, or, for
                // a window reaching past the keys that start with that, a
                // shorter prefix (down to what the range's ends share).
                let mut base = shared(&self.near, &self.lo);
                let least = shared(&self.lo, &self.hi).len();
                let mut w = rescale(w, len, base.len());
                let end = loop {
                    match pos(&base, &self.lo).checked_add(w) {
                        Some(at) => break key_at(&base, at),
                        None if base.len() > least => {
                            base.pop();
                            w = rescale(w, base.len() + 1, base.len());
                        }
                        None => break provisioning::store::prefix_end(&base).unwrap_or_default(),
                    }
                };
                let end = if end > self.lo && end < self.hi {
                    end
                } else {
                    self.hi.clone()
                };
                let end = self.first_page_end.clone().unwrap_or(end);
                (self.lo.clone(), end, base, w)
            }
            Some((w, len)) => {
                // The window ends at `hi` and reaches down `w`, but not
                // past halfway to a floor (keys are between them).
                let bottom = self.floor.clone().unwrap_or_else(|| self.lo.clone());
                let base = shared(&bottom, &self.hi);
                let w = rescale(w, len, base.len());
                let (a, b) = (pos(&base, &bottom), pos(&base, &self.hi));
                let mut at = b.saturating_sub(w);
                if self.floor.is_some() {
                    at = at.max(a + b.saturating_sub(a) / 2);
                }
                let start = self.pin.take().unwrap_or_else(|| key_at(&base, at));
                let start = if start > self.lo && start < self.hi {
                    start
                } else {
                    self.lo.clone()
                };
                (start, self.hi.clone(), base, w)
            }
        };
        // Newest first, a window too dense to narrow is read sorted, as
        // etcd can (reading its every value).
        let descend = self.rev && (!self.placed() || self.dense);
        let ask = Ask {
            key,
            range_end,
            limit: self.limit,
            descend,
        };
        self.asked = Some((ask.clone(), base, width));
        Some(ask)
    }

    /// etcd's answer to the last [`Pager::ask`]: the entries it gives, in
    /// the scan's order (perhaps none yet).
    pub fn answer(&mut self, kvs: Vec<Kv>, more: bool, count: i64) -> Vec<Kv> {
        let Some((ask, base, width)) = self.asked.take() else {
            return Vec::new();
        };
        if let (Some((first, _)), Some((last, _))) = (kvs.first(), kvs.last()) {
            if kvs.len() > 1 {
                self.near = shared(first, last);
            }
        }
        if self.rev {
            self.backward(&ask, &base, width, kvs, more, count)
        } else {
            self.forward(&ask, &base, width, kvs, more, count)
        }
    }

    fn forward(
        &mut self,
        ask: &Ask,
        base: &[u8],
        width: u128,
        kvs: Vec<Kv>,
        more: bool,
        count: i64,
    ) -> Vec<Kv> {
        match kvs.last() {
            Some((last, _)) if more => {
                self.lo.clone_from(last);
                self.lo.push(0);
            }
            _ if ask.range_end == self.hi => self.done = true,
            _ => self.lo.clone_from(&ask.range_end),
        }
        self.width = match self.width {
            // The first answer: a long range goes on through windows as
            // wide as this page was.
            None if more && count > WINDOWED * self.limit && self.placed() => self.first(&kvs),
            None => None,
            // Past the first page a scan read before: climb from there.
            Some(_) if self.first_page_end.as_ref() == Some(&self.lo) => {
                self.first_page_end = None;
                self.climb_from_lo();
                self.width
            }
            // Climbing: past empty prefixes to the first that holds a key
            // after `ladder`; from there, windows sized by what it held.
            Some(w) if self.climb.is_some() => {
                let others = count - i64::from(kvs.first().is_some_and(|(k, _)| *k == self.ladder));
                if others <= 0 {
                    self.climb = self.climb.map(|n| n.saturating_sub(1));
                    Some(w)
                } else {
                    self.climb = None;
                    let base = shared(&ask.key, &ask.range_end);
                    let width = measured(ask, &base, u128::MAX);
                    self.near = base;
                    Some((self.adjust(width, count), self.near.len()))
                }
            }
            Some(_) => Some((self.adjust(measured(ask, base, width), count), base.len())),
        };
        kvs
    }

    fn backward(
        &mut self,
        ask: &Ask,
        base: &[u8],
        width: u128,
        mut kvs: Vec<Kv>,
        more: bool,
        count: i64,
    ) -> Vec<Kv> {
        if ask.descend {
            // Sorted last first: the newest page of a range open at its
            // end, or of a window too dense to narrow.
            match kvs.last() {
                Some((last, _)) if more => self.hi.clone_from(last),
                _ if self.width.is_none() => self.done = true,
                _ => {
                    self.dense = false;
                    self.floor = None;
                    self.width = Some((self.adjust(measured(ask, base, width), count), base.len()));
                    self.next_window(ask);
                }
            }
            return self.out(kvs);
        }
        if self.width.is_none() {
            // The first answer, in key order: all of a short range, or a
            // long range's first page, given out last.
            let Some((last, _)) = kvs.last().filter(|_| more) else {
                self.done = true;
                kvs.reverse();
                return kvs;
            };
            self.width = self.first(&kvs);
            self.floor = Some(last.clone());
            self.lo.clone_from(last);
            self.lo.push(0);
            self.lowest = kvs;
            return Vec::new();
        }
        let m = measured(ask, base, width);
        self.width = Some((self.adjust(m, count), base.len()));
        if let Some((last, _)) = kvs.last().filter(|_| more) {
            // Too wide: these are the window's oldest keys, not its
            // newest; there are more above the last of them. Asked again,
            // narrower, or sorted if it cannot be.
            self.floor = Some(last.clone());
            self.dense = m <= 1;
            // Fewer than two pages: the newest page starts at one of
            // these keys.
            let over = usize::try_from(count)
                .unwrap_or(usize::MAX)
                .saturating_sub(kvs.len());
            if over < kvs.len() {
                self.pin = Some(kvs[over].0.clone());
                self.dense = false;
            }
            return Vec::new();
        }
        if !kvs.is_empty() {
            self.floor = None;
        }
        self.next_window(ask);
        kvs.reverse();
        self.out(kvs)
    }

    /// Newest first: `kvs`, then the first page once all above it is out.
    fn out(&mut self, mut kvs: Vec<Kv>) -> Vec<Kv> {
        if self.done {
            kvs.extend(std::mem::take(&mut self.lowest).into_iter().rev());
        }
        kvs
    }

    /// The width of a first page, from its first key to its last.
    fn first(&self, kvs: &[Kv]) -> Option<(u128, usize)> {
        let (first, last) = (&kvs.first()?.0, &kvs.last()?.0);
        let span = pos(&self.near, last).saturating_sub(pos(&self.near, first));
        Some((self.adjust(span.max(1), kvs.len() as i64), self.near.len()))
    }

    /// Newest first: the window `ask` covered is read; the next ends
    /// where it started.
    fn next_window(&mut self, ask: &Ask) {
        if ask.key <= self.lo {
            self.done = true;
        } else {
            self.hi.clone_from(&ask.key);
        }
    }

    /// A width that would hold about a page, from one of `width` that
    /// held `count` keys.
    fn adjust(&self, width: u128, count: i64) -> u128 {
        if count <= 0 {
            return width.saturating_mul(EMPTY_GROWTH);
        }
        let ratio = (self.limit as f64 / count as f64).min(GROWTH);
        let next = (width as f64 * ratio) as u128;
        next.clamp(1, width.saturating_mul(GROWTH as u128))
    }
}

/// The width a request's window covered: its ends' distance, where both
/// lie on the line after `base`; else the width asked for.
fn measured(ask: &Ask, base: &[u8], width: u128) -> u128 {
    if ask.key.starts_with(base) && ask.range_end.starts_with(base) {
        let d = pos(base, &ask.range_end).saturating_sub(pos(base, &ask.key));
        if d > 0 {
            return d.min(width.max(1));
        }
    }
    width.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// etcd 3.4's range: every key of the range walked for `count`;
    /// sorted, every value read. What a scan costs, in keys touched.
    struct Etcd {
        keys: BTreeMap<Vec<u8>, Vec<u8>>,
        touched: u64,
        requests: u64,
    }

    impl Etcd {
        fn new(keys: impl IntoIterator<Item = Vec<u8>>) -> Self {
            Etcd {
                keys: keys.into_iter().map(|k| (k.clone(), k)).collect(),
                touched: 0,
                requests: 0,
            }
        }

        fn range(&mut self, ask: &Ask) -> (Vec<Kv>, bool, i64) {
            self.requests += 1;
            let mut all: Vec<Kv> = if ask.range_end == [0] {
                self.keys.range(ask.key.clone()..)
            } else {
                if ask.range_end <= ask.key {
                    return (Vec::new(), false, 0);
                }
                self.keys.range(ask.key.clone()..ask.range_end.clone())
            }
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
            self.touched += all.len() as u64;
            let count = all.len() as i64;
            if ask.descend {
                all.reverse();
            }
            let more = ask.limit > 0 && count > ask.limit;
            all.truncate(if ask.limit > 0 {
                ask.limit as usize
            } else {
                all.len()
            });
            (all, more, count)
        }

        fn scan(&mut self, from: &[u8], end: &[u8], rev: bool, limit: i64) -> Vec<Vec<u8>> {
            let mut p = Pager::new(from.to_vec(), end.to_vec(), rev, limit);
            let mut out = Vec::new();
            while let Some(ask) = p.ask() {
                let (kvs, more, count) = self.range(&ask);
                out.extend(p.answer(kvs, more, count).into_iter().map(|(k, _)| k));
                assert!(self.requests < 1_000_000, "a scan that does not end");
            }
            out
        }
    }

    fn under(prefix: &str, keys: impl IntoIterator<Item = Vec<u8>>) -> Vec<Vec<u8>> {
        keys.into_iter()
            .map(|k| [prefix.as_bytes(), &k].concat())
            .collect()
    }

    /// Key sets alike in nothing: decimal ids, big-endian sequence
    /// numbers, random hex serials, keys alike in their first 20 bytes,
    /// clusters far apart.
    fn shapes(n: u64) -> Vec<(&'static str, Vec<Vec<u8>>)> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        vec![
            (
                "decimal ids",
                under(
                    "fg/devices/",
                    (0..n).map(|i| format!("dev-{i:07}").into_bytes()),
                ),
            ),
            (
                "sequence numbers",
                under("fg/audit/", (1..=n).map(|i| i.to_be_bytes().to_vec())),
            ),
            (
                "random serials",
                under(
                    "fg/certs/",
                    (0..n).map(|_| format!("{:016x}{:016x}", rnd(), rnd()).into_bytes()),
                ),
            ),
            (
                "alike for 20 bytes",
                under(
                    "fg/x/",
                    (0..n).map(|i| format!("aaaaaaaaaaaaaaaaaaaa{i:06}").into_bytes()),
                ),
            ),
            (
                // The admin before every device.
                "one key far before the rest",
                under(
                    "fg/sorted/",
                    std::iter::once(b"admin".to_vec())
                        .chain((1..n).map(|i| format!("dev-{i:07}").into_bytes())),
                ),
            ),
            (
                "clusters",
                under(
                    "fg/x/",
                    (0..n).map(|i| {
                        let c = ["a", "m/deep/er", "zz"][(i % 3) as usize];
                        format!("{c}{i:08}").into_bytes()
                    }),
                ),
            ),
        ]
    }

    #[test]
    fn every_key_once_in_order_and_the_cost_stays_linear() {
        let n = 60_000u64;
        for (shape, keys) in shapes(n) {
            for rev in [false, true] {
                let mut etcd = Etcd::new(keys.iter().cloned());
                let prefix = &keys[0][..keys[0].iter().rposition(|b| *b == b'/').unwrap() + 1];
                let end = provisioning::store::prefix_end(prefix).unwrap();
                let got = etcd.scan(prefix, &end, rev, 512);
                let mut want: Vec<Vec<u8>> = etcd.keys.keys().cloned().collect();
                if rev {
                    want.reverse();
                }
                assert!(got == want, "{shape} (rev {rev}): every key once, in order");
                // Naively, n²/2/page: some 3.5 million keys touched here.
                assert!(
                    etcd.touched < 16 * n,
                    "{shape} (rev {rev}): {} keys touched for {n}, {} requests",
                    etcd.touched,
                    etcd.requests
                );
            }
        }
    }

    #[test]
    fn part_of_a_range_and_ranges_short_or_empty() {
        let keys = under("p/", (0..5_000u32).map(|i| format!("k{i:05}").into_bytes()));
        let mut etcd = Etcd::new(keys.iter().cloned());
        for (from, end) in [
            (&b"p/k01234"[..], &b"p/k04000"[..]),
            (b"p/k00000", b"p/k00003"),
            (b"p/z", b"p0"),
            (b"p/k5", b"p/k4"),
            (b"p/k04990", b"\0"),
        ] {
            for rev in [false, true] {
                let got = etcd.scan(from, end, rev, 64);
                let mut want: Vec<Vec<u8>> = etcd
                    .keys
                    .keys()
                    .filter(|k| k.as_slice() >= from && (end == b"\0" || k.as_slice() < end))
                    .cloned()
                    .collect();
                if rev {
                    want.reverse();
                }
                assert_eq!(got, want, "{from:?}..{end:?} rev {rev}");
            }
        }
    }

    #[test]
    fn the_newest_page_below_a_bound_costs_about_a_page() {
        // The audit log: numbers, newest first below the last given out.
        let n = 200_000u64;
        let mut etcd = Etcd::new(under(
            "fg/audit/",
            (1..=n).map(|i| i.to_be_bytes().to_vec()),
        ));
        for below in [n + 1, n / 2, 513] {
            etcd.touched = 0;
            etcd.requests = 0;
            let end = [&b"fg/audit/"[..], &below.to_be_bytes()].concat();
            let mut p = Pager::newest_below(b"fg/audit/".to_vec(), end, 512);
            let mut got = Vec::new();
            while got.len() < 512 {
                let Some(ask) = p.ask() else { break };
                let (kvs, more, count) = etcd.range(&ask);
                got.extend(p.answer(kvs, more, count));
            }
            let seqs: Vec<u64> = got
                .iter()
                .take(512)
                .map(|(k, _)| u64::from_be_bytes(k[9..].try_into().unwrap()))
                .collect();
            let want: Vec<u64> = (1..below).rev().take(512).collect();
            assert_eq!(seqs, want, "below {below}");
            assert!(
                etcd.touched <= 4 * 512 && etcd.requests <= 40,
                "below {below}: {} keys touched, {} requests",
                etcd.touched,
                etcd.requests
            );
        }
    }

    #[test]
    fn a_page_from_a_cursor_or_a_first_page_end_key_costs_about_a_page() {
        let n = 200_000u64;
        for (shape, keys) in shapes(n) {
            let mut etcd = Etcd::new(keys.iter().cloned());
            let prefix = &keys[0][..keys[0].iter().rposition(|b| *b == b'/').unwrap() + 1];
            let end = provisioning::store::prefix_end(prefix).unwrap();
            let sorted: Vec<Vec<u8>> = etcd.keys.keys().cloned().collect();
            let page = |etcd: &mut Etcd, mut p: Pager| {
                let mut got = Vec::new();
                while got.len() < 512 {
                    let Some(ask) = p.ask() else { break };
                    let (kvs, more, count) = etcd.range(&ask);
                    got.extend(p.answer(kvs, more, count).into_iter().map(|(k, _)| k));
                }
                got.truncate(512);
                got
            };
            // From a cursor in the middle; from the first key found before
            // (and keys put before it since).
            let cursor = sorted[n as usize / 2].clone();
            let cases = [
                (
                    "cursor",
                    Pager::oldest_from(cursor.clone(), end.clone(), None, 512),
                    &sorted[n as usize / 2..],
                ),
                (
                    "after a first page",
                    Pager::oldest_from(
                        prefix.to_vec(),
                        end.clone(),
                        Some(sorted[300].clone()),
                        512,
                    ),
                    &sorted[..],
                ),
            ];
            for (case, pager, want) in cases {
                etcd.touched = 0;
                etcd.requests = 0;
                assert!(
                    page(&mut etcd, pager) == want[..512],
                    "{shape} ({case}): the page"
                );
                // The first prefix of the cursor holding a page may hold
                // up to 256 times as many (binary keys: the 65,536 numbers
                // alike but for their last two bytes, half of them after
                // the cursor); decimal and hex keys, 10 and 16.
                assert!(
                    etcd.touched < 64 * 512 && etcd.requests < 40,
                    "{shape} ({case}): {} keys touched, {} requests",
                    etcd.touched,
                    etcd.requests
                );
            }
        }
    }

    #[test]
    fn a_short_range_is_one_request() {
        let keys = under("p/", (0..100u32).map(|i| format!("k{i:03}").into_bytes()));
        for rev in [false, true] {
            let mut etcd = Etcd::new(keys.iter().cloned());
            assert_eq!(etcd.scan(b"p/", b"p0", rev, 512).len(), 100);
            assert_eq!(etcd.requests, 1, "rev {rev}");
        }
    }
}
