//! Archive segments: a run of consecutive events, compressed, with an index of the ids they
//! mention, in one file `DIR/archive/FIRST-LAST.seg` (seqs zero-padded to 20 digits).
//!
//! # File layout
//!
//! ```text
//! "AGSEG001"                      8 bytes, the magic and layout version
//! header length                   u32 little-endian
//! header                          JSON: seqs, times, event-id range, section lengths and CRC32s
//! header CRC32                    u32 little-endian
//! index section                   zstd: one JSON-quoted id per line, sorted, deduplicated: the
//!                                 ids the events name, and the event ids they name as cause
//!                                 that are not in this segment (so an effect is found from
//!                                 its cause across segments)
//! events section                  zstd (with its content checksum): per event, in seq order,
//!                                 seq u64 LE, length u32 LE, the envelope's bytes as stored
//! ```
//!
//! The header comes first so that `why` reads the header and the index and never the events of
//! a segment that does not mention its id. Any mismatch (magic, length, CRC, a seq out of order,
//! a record cut short) makes the whole segment damaged: it is reported by its file name.

use std::collections::{BTreeSet, HashSet};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::clock::Millis;
use crate::events::Envelope;

const MAGIC: &[u8; 8] = b"AGSEG001";
/// zstd level: 3 is zstd's default, fast to write and about 8x on this JSON.
const LEVEL: i32 = 3;
/// The largest header accepted (a damaged length field must not make us allocate gigabytes).
const MAX_HEADER: u32 = 64 * 1024;

/// One archive segment, as named by its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    /// The file.
    pub path: PathBuf,
    /// The first seq it holds.
    pub first_seq: u64,
    /// The last seq it holds.
    pub last_seq: u64,
}

impl SegmentInfo {
    /// The segment of seqs `first..=last` in archive directory `dir`.
    pub(crate) fn new(dir: &Path, first: u64, last: u64) -> Self {
        Self {
            path: dir.join(format!("{first:020}-{last:020}.seg")),
            first_seq: first,
            last_seq: last,
        }
    }

    /// Parses a file name `FIRST-LAST.seg`; `None` for anything else (temp files included).
    pub(crate) fn parse(dir: &Path, name: &str) -> Option<Self> {
        let (first, last) = name.strip_suffix(".seg")?.split_once('-')?;
        let (first, last) = (first.parse().ok()?, last.parse().ok()?);
        (first >= 1 && first <= last).then(|| Self::new(dir, first, last))
    }

    /// The file's name, for messages.
    pub fn file_name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// A segment's header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Header {
    pub first_seq: u64,
    pub last_seq: u64,
    pub first_at: Millis,
    pub last_at: Millis,
    pub min_event_id: Uuid,
    pub max_event_id: Uuid,
    pub index_len: u64,
    pub index_crc32: u32,
    pub events_len: u64,
    pub events_crc32: u32,
}

impl Header {
    /// Whether event id `id` may be in this segment (ids are UUID v7: ordered by time).
    pub(crate) fn may_hold_event(&self, id: Uuid) -> bool {
        self.min_event_id <= id && id <= self.max_event_id
    }
}

/// Why a segment cannot be read.
pub(crate) type Damage = String;

/// Builds a segment from events in seq order: their bytes as stored and their decoded form
/// (for the index and the header).
pub(crate) struct SegmentWriter {
    records: zstd::stream::Encoder<'static, Vec<u8>>,
    ids: BTreeSet<String>,
    events: HashSet<Uuid>,
    causes: HashSet<Uuid>,
    header: Option<Header>,
}

impl SegmentWriter {
    /// An empty segment.
    pub(crate) fn new() -> std::io::Result<Self> {
        let mut records = zstd::stream::Encoder::new(Vec::new(), LEVEL)?;
        records.include_checksum(true)?;
        Ok(Self {
            records,
            ids: BTreeSet::new(),
            events: HashSet::new(),
            causes: HashSet::new(),
            header: None,
        })
    }

    /// Adds the next event.
    pub(crate) fn push(&mut self, env: &Envelope, stored: &[u8]) -> std::io::Result<()> {
        self.records.write_all(&env.seq.to_le_bytes())?;
        self.records
            .write_all(&(stored.len() as u32).to_le_bytes())?;
        self.records.write_all(stored)?;
        self.events.insert(env.id);
        self.causes.extend(env.cause);
        let e = &env.event;
        let ids = e.session_ids().into_iter();
        let ids = ids.chain(e.message_id().map(|m| m.as_str()));
        for id in ids.chain(e.command_id().map(|c| c.as_str())) {
            if !self.ids.contains(id) {
                self.ids.insert(id.to_owned());
            }
        }
        let h = self.header.get_or_insert(Header {
            first_seq: env.seq,
            last_seq: env.seq,
            first_at: env.at,
            last_at: env.at,
            min_event_id: env.id,
            max_event_id: env.id,
            index_len: 0,
            index_crc32: 0,
            events_len: 0,
            events_crc32: 0,
        });
        h.last_seq = env.seq;
        h.last_at = env.at;
        h.min_event_id = h.min_event_id.min(env.id);
        h.max_event_id = h.max_event_id.max(env.id);
        Ok(())
    }

    /// The seqs pushed so far.
    pub(crate) fn seqs(&self) -> Option<(u64, u64)> {
        self.header.as_ref().map(|h| (h.first_seq, h.last_seq))
    }

    /// The whole file's bytes; `None` when nothing was pushed.
    pub(crate) fn finish(self) -> std::io::Result<Option<Vec<u8>>> {
        let Some(mut h) = self.header else {
            return Ok(None);
        };
        let events = self.records.finish()?;
        let outside = self.causes.difference(&self.events).map(Uuid::to_string);
        let mut encoded: Vec<Vec<u8>> = self
            .ids
            .into_iter()
            .chain(outside)
            .map(|id| serde_json::to_vec(&id).expect("strings serialize"))
            .collect();
        encoded.sort_unstable();
        encoded.dedup();
        let mut lines = Vec::new();
        for line in encoded {
            lines.extend_from_slice(&line);
            lines.push(b'\n');
        }
        let index = zstd::bulk::compress(&lines, LEVEL)?;
        (h.index_len, h.index_crc32) = (index.len() as u64, crc32fast::hash(&index));
        (h.events_len, h.events_crc32) = (events.len() as u64, crc32fast::hash(&events));
        let header = serde_json::to_vec(&h).expect("header serializes");
        let mut out = Vec::with_capacity(16 + header.len() + index.len() + events.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(&crc32fast::hash(&header).to_le_bytes());
        out.extend_from_slice(&index);
        out.extend_from_slice(&events);
        Ok(Some(out))
    }
}

/// An open segment file, its header checked.
pub(crate) struct SegmentFile {
    file: std::fs::File,
    pub header: Header,
}

impl SegmentFile {
    /// Opens `info`'s file (never through a symlink) and checks its header against its name and
    /// its length.
    pub(crate) fn open(info: &SegmentInfo) -> Result<Self, Damage> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&info.path)
            .map_err(|e| format!("cannot open it: {e}"))?;
        let len = file.metadata().map_err(|e| e.to_string())?.len();
        let mut fixed = [0u8; 12];
        read_exact(&mut file, &mut fixed, "the header")?;
        if &fixed[..8] != MAGIC {
            return Err("not an agentsync archive segment (bad magic)".into());
        }
        let header_len = u32::from_le_bytes(fixed[8..12].try_into().expect("4 bytes"));
        if header_len > MAX_HEADER {
            return Err(format!("header length {header_len} is implausible"));
        }
        let mut header = vec![0u8; header_len as usize + 4];
        read_exact(&mut file, &mut header, "the header")?;
        let (header, crc) = header.split_at(header_len as usize);
        if crc32fast::hash(header) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            return Err("header checksum mismatch".into());
        }
        let h: Header =
            serde_json::from_slice(header).map_err(|e| format!("header undecodable: {e}"))?;
        if (h.first_seq, h.last_seq) != (info.first_seq, info.last_seq) {
            return Err(format!(
                "header says seqs {}..={}, the name says otherwise",
                h.first_seq, h.last_seq
            ));
        }
        let expected = (16 + u64::from(header_len))
            .checked_add(h.index_len)
            .and_then(|n| n.checked_add(h.events_len))
            .ok_or("section lengths overflow")?;
        if len != expected {
            return Err(format!(
                "{len} bytes long, expected {expected} (truncated or extended)"
            ));
        }
        Ok(Self { file, header: h })
    }

    /// The index, decompressed.
    pub(crate) fn index(&mut self) -> Result<SegmentIndex, Damage> {
        let index = self.section(self.header.index_len, self.header.index_crc32, "index")?;
        let lines = zstd::stream::decode_all(&index[..])
            .map_err(|e| format!("index undecompressable: {e}"))?;
        Ok(SegmentIndex::new(lines))
    }

    /// Every record, decompressed and checked: seqs consecutive from the header's first to its
    /// last, each record whole.
    pub(crate) fn records(mut self) -> Result<Records, Damage> {
        let (len, crc) = (self.header.events_len, self.header.events_crc32);
        // The events section follows the index: reading it sequentially skips the index.
        let _index = self.section(self.header.index_len, self.header.index_crc32, "index")?;
        let events = self.section(len, crc, "events")?;
        let data = zstd::stream::decode_all(&events[..])
            .map_err(|e| format!("events undecompressable: {e}"))?;
        Records::index(data, &self.header)
    }

    /// Reads the next section of `len` bytes and checks its CRC32.
    fn section(&mut self, len: u64, crc: u32, what: &str) -> Result<Vec<u8>, Damage> {
        let mut buf = vec![0u8; usize::try_from(len).map_err(|e| e.to_string())?];
        read_exact(&mut self.file, &mut buf, what)?;
        if crc32fast::hash(&buf) != crc {
            return Err(format!("{what} checksum mismatch"));
        }
        Ok(buf)
    }
}

fn read_exact(file: &mut std::fs::File, buf: &mut [u8], what: &str) -> Result<(), Damage> {
    file.read_exact(buf)
        .map_err(|e| format!("cannot read {what}: {e}"))
}

/// A segment's events, decompressed: record `i` holds seq `first + i`.
pub(crate) struct Records {
    data: Vec<u8>,
    first: u64,
    /// Start and end of each record's envelope bytes in `data`.
    spans: Vec<(usize, usize)>,
}

impl Records {
    /// Finds each record and checks the seqs against the header.
    fn index(data: Vec<u8>, h: &Header) -> Result<Self, Damage> {
        let count = h.last_seq - h.first_seq + 1;
        let mut spans = Vec::with_capacity(usize::try_from(count).unwrap_or(0).min(1 << 20));
        let mut at = 0usize;
        while at < data.len() {
            let expected = h.first_seq + spans.len() as u64;
            let head = data
                .get(at..at + 12)
                .ok_or_else(|| format!("record of seq {expected} cut short"))?;
            let seq = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
            let len = u32::from_le_bytes(head[8..].try_into().expect("4 bytes")) as usize;
            if seq != expected {
                return Err(format!("record of seq {seq} where seq {expected} belongs"));
            }
            let (start, end) = (at + 12, at + 12 + len);
            if end > data.len() {
                return Err(format!("record of seq {seq} cut short"));
            }
            spans.push((start, end));
            at = end;
        }
        if spans.len() as u64 != count {
            return Err(format!("{} records, expected {count}", spans.len()));
        }
        Ok(Self {
            data,
            first: h.first_seq,
            spans,
        })
    }

    /// The stored bytes of `seq`, if this segment holds it.
    pub(crate) fn get(&self, seq: u64) -> Option<&[u8]> {
        let i = usize::try_from(seq.checked_sub(self.first)?).ok()?;
        self.spans.get(i).map(|&(s, e)| &self.data[s..e])
    }

    /// The last seq held.
    pub(crate) fn last(&self) -> u64 {
        self.first + self.spans.len() as u64 - 1
    }
}

/// A segment's index: its lines (JSON-quoted ids), sorted, looked up by binary search.
pub(crate) struct SegmentIndex {
    lines: Vec<u8>,
    spans: Vec<(usize, usize)>,
}

impl SegmentIndex {
    fn new(lines: Vec<u8>) -> Self {
        let mut spans = Vec::new();
        let mut start = 0;
        for end in memchr::memchr_iter(b'\n', &lines) {
            spans.push((start, end));
            start = end + 1;
        }
        // Written sorted; sorted again so that a lookup never depends on it.
        spans.sort_unstable_by(|a, b| lines[a.0..a.1].cmp(&lines[b.0..b.1]));
        Self { lines, spans }
    }

    /// Whether `id` (a command, message, chat or agent session id, or an event id named as a
    /// cause from outside the segment) is listed.
    pub(crate) fn contains(&self, id: &str) -> bool {
        let needle = serde_json::to_vec(id).expect("strings serialize");
        self.spans
            .binary_search_by(|&(s, e)| self.lines[s..e].cmp(&needle[..]))
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::History;

    fn segment(dir: &Path) -> (SegmentInfo, Vec<u8>) {
        let mut w = SegmentWriter::new().unwrap();
        let events = History::of(&History::random_steps(5, 40), 1_763_700_000_000);
        let mut last = 0;
        for (i, new) in events.into_iter().enumerate() {
            let env = Envelope {
                seq: i as u64 + 1,
                id: new.id,
                at: new.at,
                v: new.event.kind().version(),
                event: new.event,
                cause: new.cause,
            };
            w.push(&env, &env.encode()).unwrap();
            last = env.seq;
        }
        (SegmentInfo::new(dir, 1, last), w.finish().unwrap().unwrap())
    }

    fn read(seg: &SegmentInfo) -> Result<Records, Damage> {
        SegmentFile::open(seg).and_then(SegmentFile::records)
    }

    #[test]
    fn a_segment_reads_back_and_any_cut_or_flipped_byte_is_damage_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let (seg, bytes) = segment(dir.path());
        std::fs::write(&seg.path, &bytes).unwrap();
        let records = read(&seg).unwrap();
        assert_eq!(records.last(), seg.last_seq);
        let first = Envelope::decode(records.get(1).unwrap()).unwrap();
        let mut file = SegmentFile::open(&seg).unwrap();
        let index = file.index().unwrap();
        for id in first.event.session_ids() {
            assert!(index.contains(id), "{id}");
        }
        assert!(!index.contains("no-such-id"));
        for cut in (0..bytes.len()).step_by(37) {
            std::fs::write(&seg.path, &bytes[..cut]).unwrap();
            assert!(read(&seg).is_err(), "cut at {cut}");
        }
        for at in (0..bytes.len()).step_by(11) {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x20;
            std::fs::write(&seg.path, &damaged).unwrap();
            assert!(read(&seg).is_err(), "byte {at} flipped");
        }
        let other = SegmentInfo::new(dir.path(), 2, seg.last_seq);
        std::fs::write(&other.path, &bytes).unwrap();
        let err = read(&other).err().unwrap();
        assert!(err.contains("the name says otherwise"), "{err}");
    }
}
