//! One console stream out of two: the BIOS screen's text mirror (int 10h) and the serial port
//! (COM1). A boot program that writes every character to both (as kiln's does) would show
//! everything twice; [`ConsoleMerge`] shows it once, and still shows a program that writes
//! only through int 10h. It serves both engines:
//!
//! - **[`MergeOrder::Exact`]** (the builtin VMM, which sees both streams in the order the
//!   guest wrote them): what one int 10h call mirrors is held until the next output event.
//!   When the next event is COM1 output that repeats it (see *matching* below), the held copy
//!   of the repeated bytes is dropped and COM1's is shown; anything else (more video, output
//!   that differs, the guest waiting in `hlt` or for a key: [`ConsoleMerge::flush`]) shows
//!   the held bytes first. The terminal receives the bytes the mirror's cursor bookkeeping
//!   assumes, except that a character both streams wrote is sent once.
//! - **[`MergeOrder::Streams`]** (QEMU + SeaBIOS: the video mirror is SeaBIOS's serial console
//!   on COM2, a stream of its own that lags COM1 by up to a character): video bytes are held
//!   for [`VIDEO_HOLD`], then shown, until the guest first writes COM1. COM1's first output is
//!   held for [`VIDEO_HOLD`] too, so that video bytes written just before it (SeaBIOS's
//!   `Booting from Hard Disk...` line, which sercon sends lazily, with the program's first
//!   character) arrive, in whichever order two sockets deliver them. Then the held video
//!   bytes that repeat what COM1 printed are dropped, the rest are shown, then COM1's, and
//!   from then on the video mirror is suppressed: COM1 alone is shown (text a program then
//!   writes only to the screen is not shown either: two sockets give no order to tell it by).
//!   Should the video have run ahead of COM1 by more than [`VIDEO_HOLD`] (a host too busy to
//!   read a socket in time), the video already shown is compared too, and COM1's bytes that
//!   repeat it are dropped instead, up to the first byte that differs. A program that never
//!   writes COM1 gets its video shown [`VIDEO_HOLD`] late; one that writes both shows each
//!   character once, and SeaBIOS's own messages before it are kept.
//!
//! *Matching*: the held video bytes are scanned from the oldest; the first position from
//! which the held tail and the COM1 bytes agree (one is a prefix of the other) and which does
//! not lie inside a terminal escape sequence (`ESC [ ... final`) is where the repetition
//! starts. Everything the merge holds is bounded by [`MAX_HELD`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How long video bytes wait for the COM1 bytes that may repeat them (QEMU).
pub const VIDEO_HOLD: Duration = Duration::from_millis(60);
/// The most bytes the merge holds back; beyond this, held bytes are shown at once.
pub const MAX_HELD: usize = 64 << 10;
/// How much of the video shown before COM1 starts is kept to compare COM1 with.
const SHOWN_KEPT: usize = 4096;

/// How the two streams reach the merge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeOrder {
    /// In the order the guest wrote them (one process sees both ports).
    Exact,
    /// As two independent streams whose relative order is known only roughly.
    Streams,
}

#[derive(Debug)]
enum Serial {
    /// The guest has not written COM1.
    Silent,
    /// COM1's first output, held until `until` (streams only).
    Starting { until: Instant, pending: Vec<u8> },
    /// COM1 has been written: in streams order, video is no longer shown.
    Started,
}

/// The merge of a BIOS video mirror and a serial port into one console stream; see the
/// module documentation for the rule. Output is appended to the `out` the caller passes.
#[derive(Debug)]
pub struct ConsoleMerge {
    order: MergeOrder,
    held: Vec<u8>,
    held_at: Option<Instant>,
    serial: Serial,
    /// Streams, before COM1 starts: the last [`SHOWN_KEPT`] video bytes shown, which COM1's
    /// first output may repeat when the video ran ahead of it.
    shown: VecDeque<u8>,
    /// Streams: video already shown that COM1 has not repeated yet; COM1 bytes that repeat
    /// it are dropped.
    lead: VecDeque<u8>,
}

impl ConsoleMerge {
    /// A merge for streams reaching it in `order`.
    pub fn new(order: MergeOrder) -> ConsoleMerge {
        ConsoleMerge {
            order,
            held: Vec::new(),
            held_at: None,
            serial: Serial::Silent,
            shown: VecDeque::new(),
            lead: VecDeque::new(),
        }
    }

    fn show_held(&mut self, out: &mut Vec<u8>) {
        if self.order == MergeOrder::Streams && matches!(self.serial, Serial::Silent) {
            self.shown.extend(&self.held);
            let excess = self.shown.len().saturating_sub(SHOWN_KEPT);
            self.shown.drain(..excess);
        }
        out.append(&mut self.held);
        self.held_at = None;
    }

    fn hold(&mut self, bytes: &[u8], now: Instant, out: &mut Vec<u8>) {
        if self.held.len() + bytes.len() > MAX_HELD {
            self.show_held(out);
        }
        if bytes.len() > MAX_HELD {
            out.extend_from_slice(bytes);
            return;
        }
        if self.held.is_empty() {
            self.held_at = Some(now);
        }
        self.held.extend_from_slice(bytes);
    }

    /// Text the BIOS screen mirror printed.
    pub fn video(&mut self, bytes: &[u8], now: Instant, out: &mut Vec<u8>) {
        match (self.order, &self.serial) {
            (MergeOrder::Exact, _) => {
                // One call's output at a time: the previous one had no repetition.
                self.show_held(out);
                self.hold(bytes, now, out);
            }
            (MergeOrder::Streams, Serial::Started) => {}
            (MergeOrder::Streams, _) => self.hold(bytes, now, out),
        }
    }

    /// Bytes the guest wrote to COM1 (or another serial-like port).
    pub fn serial(&mut self, bytes: &[u8], now: Instant, out: &mut Vec<u8>) {
        if bytes.is_empty() {
            return;
        }
        match self.order {
            MergeOrder::Exact => {
                self.serial = Serial::Started;
                match repetition(&self.held, bytes) {
                    Some(at) => {
                        let rest = self.held.split_off(at);
                        self.show_held(out);
                        out.extend_from_slice(bytes);
                        // Video that goes on past what COM1 printed so far stays held.
                        if rest.len() > bytes.len() {
                            self.held = rest[bytes.len()..].to_vec();
                            self.held_at = Some(now);
                        }
                    }
                    None => {
                        self.show_held(out);
                        out.extend_from_slice(bytes);
                    }
                }
            }
            MergeOrder::Streams => match &mut self.serial {
                Serial::Started => {
                    // Drop what repeats video already shown, up to the first difference.
                    let mut rest = bytes;
                    while let (Some(&b), Some(&l)) = (rest.first(), self.lead.front()) {
                        if b != l {
                            self.lead.clear();
                            break;
                        }
                        self.lead.pop_front();
                        rest = &rest[1..];
                    }
                    out.extend_from_slice(rest);
                }
                Serial::Silent => {
                    self.serial = Serial::Starting {
                        until: now + VIDEO_HOLD,
                        pending: bytes.to_vec(),
                    };
                }
                Serial::Starting { pending, .. } => {
                    pending.extend_from_slice(bytes);
                    if pending.len() > MAX_HELD {
                        self.start_serial(out);
                    }
                }
            },
        }
    }

    /// Streams: COM1's first output has waited long enough; drop the video bytes it repeats,
    /// or, where the video ran ahead and is shown already, COM1's bytes that repeat it.
    fn start_serial(&mut self, out: &mut Vec<u8>) {
        let Serial::Starting { pending, .. } = std::mem::replace(&mut self.serial, Serial::Started)
        else {
            return;
        };
        let shown: Vec<u8> = std::mem::take(&mut self.shown).into();
        let mut video = shown.clone();
        video.extend_from_slice(&self.held);
        match repetition(&video, &pending) {
            Some(at) if at >= shown.len() => {
                self.held.truncate(at - shown.len());
                out.append(&mut self.held);
                out.extend_from_slice(&pending);
            }
            Some(at) => {
                // The video showed `shown[at..]` before COM1 printed it.
                let already = &shown[at..];
                self.held.clear();
                if pending.len() < already.len() {
                    self.lead = already[pending.len()..].iter().copied().collect();
                } else {
                    out.extend_from_slice(&pending[already.len()..]);
                }
            }
            None => {
                out.append(&mut self.held);
                out.extend_from_slice(&pending);
            }
        }
        self.held_at = None;
    }

    /// When [`ConsoleMerge::tick`] has something to do next, if ever.
    pub fn deadline(&self) -> Option<Instant> {
        match (&self.serial, self.order) {
            (Serial::Starting { until, .. }, _) => Some(*until),
            (_, MergeOrder::Streams) => self.held_at.map(|at| at + VIDEO_HOLD),
            // Exact order never waits on the clock: the guest's next event decides.
            (_, MergeOrder::Exact) => None,
        }
    }

    /// Shows what has waited long enough by `now`.
    pub fn tick(&mut self, now: Instant, out: &mut Vec<u8>) {
        match &self.serial {
            Serial::Starting { until, .. } if *until <= now => self.start_serial(out),
            Serial::Silent
                if self.order == MergeOrder::Streams
                    && self.held_at.is_some_and(|at| at + VIDEO_HOLD <= now) =>
            {
                self.show_held(out)
            }
            _ => {}
        }
    }

    /// Shows everything held (the guest waits, or the streams end).
    pub fn flush(&mut self, out: &mut Vec<u8>) {
        if matches!(self.serial, Serial::Starting { .. }) {
            self.start_serial(out);
        } else if self.order == MergeOrder::Exact || matches!(self.serial, Serial::Silent) {
            self.show_held(out);
        }
    }
}

/// Where in `held` the repetition of `serial` starts: the first position, outside an escape
/// sequence, from which `held` and `serial` agree for as long as both go on.
fn repetition(held: &[u8], serial: &[u8]) -> Option<usize> {
    let mut escape = Escape::Text;
    for at in 0..held.len() {
        let inside = escape != Escape::Text;
        escape = escape.next(held[at]);
        if inside || escape != Escape::Text {
            continue;
        }
        let n = (held.len() - at).min(serial.len());
        if held[at..at + n] == serial[..n] {
            return Some(at);
        }
    }
    None
}

/// Where a scan of terminal output is with respect to escape sequences.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Escape {
    Text,
    /// After ESC.
    Esc,
    /// In a control sequence (ESC [), before its final byte.
    Csi,
}

impl Escape {
    fn next(self, b: u8) -> Escape {
        match (self, b) {
            (Escape::Text, 0x1b) => Escape::Esc,
            (Escape::Text, _) => Escape::Text,
            (Escape::Esc, b'[') => Escape::Csi,
            // A two-byte sequence (ESC c) ends here.
            (Escape::Esc, _) => Escape::Text,
            (Escape::Csi, 0x40..=0x7e) => Escape::Text,
            (Escape::Csi, _) => Escape::Csi,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `events` (true = video) into an exact merge, flushing at the end.
    fn exact(events: &[(bool, &str)]) -> String {
        let mut m = ConsoleMerge::new(MergeOrder::Exact);
        let now = Instant::now();
        let mut out = Vec::new();
        for &(video, bytes) in events {
            if video {
                m.video(bytes.as_bytes(), now, &mut out);
            } else {
                m.serial(bytes.as_bytes(), now, &mut out);
            }
        }
        m.flush(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn exact_shows_a_character_written_to_both_once() {
        let mut events = Vec::new();
        for c in ["C", "l", "i", "\r", "\n", "$", " "] {
            events.push((true, c));
            events.push((false, c));
        }
        assert_eq!(exact(&events), "Cli\r\n$ ");
    }

    #[test]
    fn exact_keeps_cursor_moves_and_differences() {
        // The mirror's cursor move is kept, its copy of the character dropped.
        assert_eq!(exact(&[(true, "\x1b[3Cx"), (false, "x")]), "\x1b[3Cx");
        // COM1 matching a byte of the escape sequence is not a repetition.
        assert_eq!(exact(&[(true, "\x1b[3Cx"), (false, "3")]), "\x1b[3Cx3");
        // Video alone, or video then different serial: everything, in order.
        assert_eq!(exact(&[(true, "a"), (true, "b")]), "ab");
        assert_eq!(exact(&[(true, "a"), (false, "b")]), "ab");
        assert_eq!(exact(&[(false, "b"), (true, "a")]), "ba");
        // A character in the last column: the mirror's wrap stays held for the next event.
        assert_eq!(
            exact(&[(true, "x\r\n"), (false, "x"), (true, "y")]),
            "x\r\ny"
        );
        // UTF-8 from CP437 is not what COM1 sent: both are shown.
        assert_eq!(exact(&[(true, "█"), (false, "\u{db}")]), "█\u{db}");
    }

    struct Clock {
        merge: ConsoleMerge,
        start: Instant,
        out: Vec<u8>,
    }

    impl Clock {
        fn new() -> Clock {
            Clock {
                merge: ConsoleMerge::new(MergeOrder::Streams),
                start: Instant::now(),
                out: Vec::new(),
            }
        }
        fn at(&self, ms: u64) -> Instant {
            self.start + Duration::from_millis(ms)
        }
        fn video(&mut self, ms: u64, s: &str) {
            let now = self.at(ms);
            self.merge.tick(now, &mut self.out);
            self.merge.video(s.as_bytes(), now, &mut self.out);
        }
        fn serial(&mut self, ms: u64, s: &str) {
            let now = self.at(ms);
            self.merge.tick(now, &mut self.out);
            self.merge.serial(s.as_bytes(), now, &mut self.out);
        }
        fn shown(&mut self, ms: u64) -> String {
            let now = self.at(ms);
            self.merge.tick(now, &mut self.out);
            String::from_utf8(self.out.clone()).unwrap()
        }
    }

    #[test]
    fn streams_show_seabios_then_the_program_once() {
        let hold = VIDEO_HOLD.as_millis() as u64;
        // sercon's lag: the program's video arrives a character after COM1's.
        for video_first in [true, false] {
            let mut c = Clock::new();
            c.video(0, "SeaBIOS\r\n");
            assert_eq!(c.shown(hold - 1), "");
            assert_eq!(c.shown(hold), "SeaBIOS\r\n");
            c.video(1000, "Booting...");
            if video_first {
                c.video(1500, ".\r\n");
                c.serial(1500, "C");
            } else {
                c.serial(1500, "C");
                c.video(1500, ".\r\n");
            }
            c.video(1501, "C");
            c.serial(1501, "li");
            c.video(1502, "l");
            assert_eq!(c.shown(1500 + hold - 1), "SeaBIOS\r\nBooting...");
            assert_eq!(c.shown(1500 + hold), "SeaBIOS\r\nBooting....\r\nCli");
            c.video(1600, "i");
            c.serial(1600, "\r\n$ ");
            c.video(1601, "\r\n$");
            assert_eq!(c.shown(5000), "SeaBIOS\r\nBooting....\r\nCli\r\n$ ");
        }
    }

    #[test]
    fn streams_drop_com1_that_repeats_video_shown_before_it() {
        // The video got far ahead: shown before COM1 was even read.
        let mut c = Clock::new();
        c.video(0, "Booting...\r\nClientAPI\r\n$ hel");
        assert_eq!(c.shown(100), "Booting...\r\nClientAPI\r\n$ hel");
        c.serial(200, "ClientAPI\r\n");
        c.video(201, "lo");
        c.serial(202, "$ h");
        assert_eq!(c.shown(400), "Booting...\r\nClientAPI\r\n$ hel");
        c.serial(500, "ello\r\n");
        c.serial(501, "olleh");
        assert_eq!(c.shown(600), "Booting...\r\nClientAPI\r\n$ hello\r\nolleh");
    }

    #[test]
    fn streams_show_a_video_only_program_late_but_whole() {
        let mut c = Clock::new();
        c.video(0, "SECTOR-TWO-OK");
        c.video(10, "\r\n");
        assert_eq!(c.shown(VIDEO_HOLD.as_millis() as u64), "SECTOR-TWO-OK\r\n");
        c.video(1000, "bcd");
        assert_eq!(c.shown(2000), "SECTOR-TWO-OK\r\nbcd");
    }

    #[test]
    fn held_bytes_are_bounded() {
        let mut m = ConsoleMerge::new(MergeOrder::Streams);
        let now = Instant::now();
        let mut out = Vec::new();
        let chunk = vec![b'x'; 4096];
        for _ in 0..100 {
            m.video(&chunk, now, &mut out);
            assert!(m.held.len() <= MAX_HELD);
        }
        assert!(out.len() >= 100 * 4096 - MAX_HELD);
        m.serial(b"y", now, &mut out);
        for _ in 0..100 {
            m.serial(&chunk, now, &mut out);
        }
        assert!(matches!(m.serial, Serial::Started));
        assert!(m.held.is_empty());
    }
}
