//! The bulk streams the ram-sender writes: stream 0 (the main stream) from
//! the sender's own thread, every extra stream from a writer thread of its
//! own, fed whole frames through a short queue. Frames on one stream keep
//! the order they were queued in; between streams nothing is ordered except
//! by FENCE barriers (docs/protocol.md, "Parallel bulk streams").

use std::io::{self, Write};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::thread::JoinHandle;

use common::mem::Mapping;
use common::tls::SendHalf;
use common::wire::{empty_frame, fence_frame, FrameType};

/// Frames queued per extra stream: enough to keep its socket busy while the
/// sender reads the next run, few enough that a claimed push page never
/// waits long behind others.
const QUEUE: usize = 4;

/// One extra stream's writer thread.
struct Writer {
    tx: Option<SyncSender<Vec<u8>>>,
    handle: Option<JoinHandle<io::Result<()>>>,
}

pub struct Streams {
    main: SendHalf,
    extra: Vec<Writer>,
    /// Buffers the writers are done with, to be filled again.
    spare: Receiver<Vec<u8>>,
    fences: u64,
}

impl Streams {
    /// Stream 0 is `main`; the extra streams come with [`Streams::start`].
    pub fn new(main: SendHalf) -> Streams {
        let (_, spare) = mpsc::channel();
        Streams {
            main,
            extra: Vec::new(),
            spare,
            fences: 0,
        }
    }

    /// Starts a writer thread for each extra stream, `extra[i]` being
    /// stream `i + 1`. Called once the sandbox is on (the sandbox wants to
    /// be entered by the only thread).
    pub fn start(&mut self, extra: Vec<SendHalf>) {
        let (spare_tx, spare) = mpsc::channel();
        self.spare = spare;
        self.extra = extra
            .into_iter()
            .enumerate()
            .map(|(i, out)| {
                let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(QUEUE);
                let spare_tx = spare_tx.clone();
                let handle = std::thread::Builder::new()
                    .name(format!("bulk{}", i + 1))
                    .spawn(move || write_queue(out, rx, spare_tx))
                    .expect("spawn a bulk-stream writer");
                Writer {
                    tx: Some(tx),
                    handle: Some(handle),
                }
            })
            .collect();
    }

    /// Bulk streams, the main stream included.
    pub fn count(&self) -> u32 {
        self.extra.len() as u32 + 1
    }

    /// Writes `bytes` (whole frames) on `stream`: at once on the main
    /// stream, queued on an extra one (blocking while its queue is full).
    pub fn write(&mut self, stream: u32, bytes: &[u8]) -> io::Result<()> {
        if stream == 0 {
            return self.main.write_all(bytes);
        }
        self.queue(stream, |buf| buf.extend_from_slice(bytes))
    }

    /// Queues on extra `stream` a spare buffer, emptied and then filled by
    /// `fill`; blocks while its queue is full.
    fn queue(&mut self, stream: u32, fill: impl FnOnce(&mut Vec<u8>)) -> io::Result<()> {
        let mut buf = self.spare.try_recv().unwrap_or_default();
        buf.clear();
        fill(&mut buf);
        let w = &mut self.extra[stream as usize - 1];
        let sent = w.tx.as_ref().map(|tx| tx.send(buf));
        match sent {
            Some(Ok(())) => Ok(()),
            _ => Err(w.finish(stream)),
        }
    }

    /// Writes a PAGES frame: `prefix`, then `len` bytes of `mem` from
    /// `offset`, on `stream`. On the main stream straight from the mapping
    /// ([`crate::zerocopy::send_run`], `scratch` only with TLS); an extra
    /// stream's writer gets a copy in its queue buffer.
    pub fn write_run(
        &mut self,
        stream: u32,
        prefix: &[u8],
        mem: &Mapping,
        offset: usize,
        len: usize,
        scratch: &mut [u8],
    ) -> io::Result<()> {
        if stream == 0 {
            return crate::zerocopy::send_run(&mut self.main, prefix, mem, offset, len, scratch);
        }
        self.queue(stream, |buf| {
            buf.extend_from_slice(prefix);
            buf.resize(prefix.len() + len, 0);
            mem.read(offset, &mut buf[prefix.len()..]);
        })
    }

    pub fn flush_main(&mut self) -> io::Result<()> {
        self.main.flush()
    }

    /// Barrier: FENCE `n` on every stream, the next number each time. The
    /// destination applies what follows the main stream's FENCE only once
    /// every stream delivered what was queued on it before its FENCE.
    /// Returns the bytes written (all streams). With one stream there is
    /// nothing to order and nothing is sent.
    pub fn fence(&mut self) -> io::Result<u64> {
        if self.extra.is_empty() {
            return Ok(0);
        }
        self.fences += 1;
        let frame = fence_frame(self.fences);
        for s in 1..self.count() {
            self.write(s, &frame)?;
        }
        self.write(0, &frame)?;
        Ok(frame.len() as u64 * u64::from(self.count()))
    }

    /// EOS on every extra stream, then waits until each writer has handed
    /// everything to its socket. Returns the bytes written.
    pub fn end_extras(&mut self) -> io::Result<u64> {
        let eos = empty_frame(FrameType::Eos);
        for s in 1..self.count() {
            self.write(s, &eos)?;
        }
        for (i, w) in self.extra.iter_mut().enumerate() {
            w.tx = None;
            if let Some(h) = w.handle.take() {
                match h.join() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(e),
                    Err(_) => {
                        return Err(io::Error::other(format!(
                            "the bulk-stream {} writer panicked",
                            i + 1
                        )))
                    }
                }
            }
        }
        Ok(eos.len() as u64 * u64::from(self.count() - 1))
    }
}

impl Writer {
    /// The writer is gone: its error.
    fn finish(&mut self, stream: u32) -> io::Error {
        self.tx = None;
        match self.handle.take().map(JoinHandle::join) {
            Some(Ok(Err(e))) => io::Error::new(e.kind(), format!("bulk-stream {stream}: {e}")),
            Some(Ok(Ok(()))) | None => io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("bulk-stream {stream} was closed"),
            ),
            Some(Err(_)) => io::Error::other(format!("the bulk-stream {stream} writer panicked")),
        }
    }
}

/// A writer thread: writes each queued buffer, flushing whenever the queue
/// runs dry, until the sender drops its end.
fn write_queue(
    mut out: SendHalf,
    rx: Receiver<Vec<u8>>,
    spare: mpsc::Sender<Vec<u8>>,
) -> io::Result<()> {
    let mut next = rx.recv().ok();
    while let Some(buf) = next {
        out.write_all(&buf)?;
        let _ = spare.send(buf);
        next = match rx.try_recv() {
            Ok(b) => Some(b),
            Err(TryRecvError::Empty) => {
                out.flush()?;
                rx.recv().ok()
            }
            Err(TryRecvError::Disconnected) => None,
        };
    }
    out.flush()
}
