//! The micro-VM's user-space devices, all port I/O: a 16550 UART on COM1
//! (vm-superio's, its interrupt on IRQ 4 through an irqfd into KVM's
//! irqchip), the i8042's reset line (a guest reboot or panic ends the VM),
//! and the port 0x92 "fast A20" register. The PIT, PIC, IOAPIC and local
//! APICs are KVM's. Every other port reads 0xff and swallows writes; MMIO
//! outside RAM does the same.
//!
//! A polling guest (the boot sectors) sees the same UART: it writes the data
//! register and reads an idle line status, and never enables interrupts.

use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// COM1's first register (data, or divisor latch low with DLAB set).
pub const COM1_BASE: u16 = 0x3f8;
const COM1_LAST: u16 = 0x3ff;
/// COM1's interrupt line on the PIC and IOAPIC (the PC's wiring).
pub const COM1_IRQ: u32 = 4;
/// The i8042's data and command/status ports.
const I8042_DATA: u16 = 0x60;
const I8042_COMMAND: u16 = 0x64;
/// System control port A: bit 1 gates A20, bit 0 would reset the machine.
const PORT_92: u16 = 0x92;

/// An edge on a KVM interrupt line: one write to an eventfd KVM listens
/// on (KVM_IRQFD).
#[derive(Debug)]
pub struct IrqLine(EventFd);

impl IrqLine {
    pub fn new() -> std::io::Result<IrqLine> {
        EventFd::new(libc::EFD_NONBLOCK).map(IrqLine)
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }

    fn try_clone(&self) -> std::io::Result<IrqLine> {
        self.0.try_clone().map(IrqLine)
    }
}

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The i8042's reset output: sets a flag the vCPU that wrote the command
/// sees right after its I/O exit.
#[derive(Debug, Clone)]
struct ResetLine(Arc<AtomicBool>);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// Where the UART's output goes: the serial log, counted, and watched for
/// one marker.
#[derive(Debug)]
struct SerialSink {
    file: File,
    counters: Arc<SinkCounters>,
}

#[derive(Debug, Default)]
struct SinkCounters {
    bytes: AtomicU64,
    /// Logged once so a broken sink does not flood the log.
    error_logged: AtomicBool,
    /// Bytes of the marker matched so far.
    matched: AtomicU64,
    marker_seen: AtomicBool,
    marker: Mutex<Option<&'static [u8]>>,
}

impl Write for SerialSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        // Counted even if the file fails: the count is the guest's
        // progress, not the file's.
        let c = &self.counters;
        c.bytes.fetch_add(data.len() as u64, Ordering::SeqCst);
        if let Some(marker) = *c.marker.lock().unwrap_or_else(|e| e.into_inner()) {
            if !c.marker_seen.load(Ordering::Relaxed) {
                let mut m = c.matched.load(Ordering::Relaxed) as usize;
                for &b in data {
                    m = if b == marker[m] {
                        m + 1
                    } else {
                        usize::from(b == marker[0])
                    };
                    if m == marker.len() {
                        c.marker_seen.store(true, Ordering::SeqCst);
                        m = 0;
                        break;
                    }
                }
                c.matched.store(m as u64, Ordering::Relaxed);
            }
        }
        if let Err(e) = self.file.write_all(data) {
            if !c.error_logged.swap(true, Ordering::Relaxed) {
                log::error!("cannot write guest serial output: {e} (logged once)");
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The UART's registers as saved (vm-superio's `SerialState`, which has no
/// serde support of its own).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UartState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// Received bytes not yet read (never any here: nothing writes to the
    /// guest's serial input).
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for UartState {
    fn from(s: SerialState) -> Self {
        UartState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&UartState> for SerialState {
    fn from(s: &UartState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// What the devices remember, carried in the saved state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    pub port92: u8,
    pub uart: UartState,
    /// Bytes the guest has written to COM1 since it booted, on every host.
    pub serial_bytes: u64,
    /// The guest printed its marker (see [`Devices::watch_for`]).
    pub marker_seen: bool,
}

type Uart = Serial<IrqLine, NoEvents, SerialSink>;

/// The device model shared by all vCPU threads.
#[derive(Debug)]
pub struct Devices {
    uart: Mutex<Uart>,
    counters: Arc<SinkCounters>,
    i8042: Mutex<I8042Device<ResetLine>>,
    reset: Arc<AtomicBool>,
    port92: AtomicU8,
    unknown_port_logged: AtomicBool,
    mmio_logged: AtomicBool,
}

impl Devices {
    /// COM1's output goes to `serial`; its interrupt is an edge on `irq`.
    pub fn new(serial: File, irq: IrqLine) -> Self {
        let counters = Arc::new(SinkCounters::default());
        let sink = SerialSink {
            file: serial,
            counters: Arc::clone(&counters),
        };
        let reset = Arc::new(AtomicBool::new(false));
        Devices {
            uart: Mutex::new(Serial::new(irq, sink)),
            counters,
            i8042: Mutex::new(I8042Device::new(ResetLine(Arc::clone(&reset)))),
            reset,
            port92: AtomicU8::new(0),
            unknown_port_logged: AtomicBool::new(false),
            mmio_logged: AtomicBool::new(false),
        }
    }

    /// Watch the serial output for `marker`; [`Devices::marker_seen`] turns
    /// true once it went by whole.
    pub fn watch_for(&self, marker: &'static [u8]) {
        assert!(!marker.is_empty());
        *self
            .counters
            .marker
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(marker);
    }

    pub fn marker_seen(&self) -> bool {
        self.counters.marker_seen.load(Ordering::SeqCst)
    }

    pub fn serial_bytes(&self) -> u64 {
        self.counters.bytes.load(Ordering::SeqCst)
    }

    /// True once the guest pulsed the i8042 reset line; cleared by the read.
    pub fn take_reset(&self) -> bool {
        self.reset.swap(false, Ordering::SeqCst)
    }

    fn uart(&self) -> std::sync::MutexGuard<'_, Uart> {
        self.uart.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn state(&self) -> DeviceState {
        DeviceState {
            port92: self.port92.load(Ordering::SeqCst),
            uart: self.uart().state().into(),
            serial_bytes: self.serial_bytes(),
            marker_seen: self.marker_seen(),
        }
    }

    /// Takes over a saved state. The UART raises its interrupt again if one
    /// was pending when it was saved, so none is lost on the way.
    pub fn set_state(&self, state: &DeviceState) -> Result<(), String> {
        self.port92.store(state.port92, Ordering::SeqCst);
        self.counters
            .bytes
            .store(state.serial_bytes, Ordering::SeqCst);
        self.counters
            .marker_seen
            .store(state.marker_seen, Ordering::SeqCst);
        let mut uart = self.uart();
        let irq = uart
            .interrupt_evt()
            .try_clone()
            .map_err(|e| format!("COM1 interrupt eventfd: {e}"))?;
        let file = uart
            .writer()
            .file
            .try_clone()
            .map_err(|e| format!("serial log: {e}"))?;
        let sink = SerialSink {
            file,
            counters: Arc::clone(&self.counters),
        };
        *uart = Serial::from_state(&(&state.uart).into(), irq, NoEvents, sink)
            .map_err(|e| format!("COM1 state: {e:?}"))?;
        Ok(())
    }

    /// An OUT (or OUTS) of `data` to `port`.
    pub fn io_out(&self, port: u16, data: &[u8]) {
        let Some(&first) = data.first() else { return };
        match port {
            COM1_BASE..=COM1_LAST => {
                let mut uart = self.uart();
                // A string OUT to the data port arrives as several bytes.
                for &b in data {
                    if let Err(e) = uart.write((port - COM1_BASE) as u8, b) {
                        log::warn!("COM1 write: {e:?}");
                    }
                }
            }
            I8042_DATA | I8042_COMMAND => {
                let mut kbd = self.i8042.lock().unwrap_or_else(|e| e.into_inner());
                let _ = kbd.write((port - I8042_DATA) as u8, first);
            }
            PORT_92 => self.port92.store(first, Ordering::Relaxed),
            _ => self.log_unknown_port(port, "write"),
        }
    }

    /// An IN from `port`: fills `data`.
    pub fn io_in(&self, port: u16, data: &mut [u8]) {
        match port {
            COM1_BASE..=COM1_LAST => {
                let mut uart = self.uart();
                for b in data.iter_mut() {
                    *b = uart.read((port - COM1_BASE) as u8);
                }
            }
            I8042_DATA | I8042_COMMAND => {
                let mut kbd = self.i8042.lock().unwrap_or_else(|e| e.into_inner());
                data.fill(kbd.read((port - I8042_DATA) as u8));
            }
            PORT_92 => data.fill(self.port92.load(Ordering::Relaxed)),
            _ => {
                self.log_unknown_port(port, "read");
                data.fill(0xff);
            }
        }
    }

    /// An access to guest-physical memory that no slot or in-kernel device
    /// covers: reads see all ones, writes are dropped.
    pub fn mmio(&self, addr: u64, data: Option<&mut [u8]>) {
        let write = data.is_none();
        if let Some(data) = data {
            data.fill(0xff);
        }
        if !self.mmio_logged.swap(true, Ordering::Relaxed) {
            log::warn!(
                "ignoring MMIO {} at {addr:#x} outside RAM (logged once)",
                if write { "write" } else { "read" }
            );
        }
    }

    fn log_unknown_port(&self, port: u16, what: &str) {
        if !self.unknown_port_logged.swap(true, Ordering::Relaxed) {
            log::info!(
                "ignoring {what} of unhandled I/O port {port:#x} (first of any, logged once)"
            );
        } else {
            log::trace!("ignoring {what} of unhandled I/O port {port:#x}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek};
    use std::os::fd::OwnedFd;

    const LCR: u16 = COM1_BASE + 3;
    const LSR: u16 = COM1_BASE + 5;
    const IER: u16 = COM1_BASE + 1;

    fn sink() -> (Devices, File, IrqLine) {
        let fd: OwnedFd = common::mem::create_memfd("serial-test", 0).unwrap();
        let file = File::from(fd);
        let reader = file.try_clone().unwrap();
        let irq = IrqLine::new().unwrap();
        let probe = irq.try_clone().unwrap();
        (Devices::new(file, irq), reader, probe)
    }

    fn contents(reader: &mut File) -> String {
        let mut out = String::new();
        reader.rewind().unwrap();
        reader.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn serial_counts_and_writes_data_bytes_only() {
        let (dev, mut reader, _) = sink();
        dev.io_out(COM1_BASE, b"a");
        // Baud-rate setup: DLAB on, divisor bytes, DLAB off.
        dev.io_out(LCR, &[0x83]);
        dev.io_out(COM1_BASE, &[0x01]);
        dev.io_out(COM1_BASE + 1, &[0x00]);
        dev.io_out(LCR, &[0x03]);
        dev.io_out(COM1_BASE, b"bc");
        assert_eq!(dev.serial_bytes(), 3);
        assert_eq!(contents(&mut reader), "abc");
    }

    #[test]
    fn port_reads() {
        let (dev, _, _) = sink();
        let mut b = [0u8; 1];
        dev.io_in(LSR, &mut b);
        assert_eq!(b[0] & 0x60, 0x60, "transmitter idle");
        dev.io_in(0x70, &mut b);
        assert_eq!(b[0], 0xff);
        dev.io_in(PORT_92, &mut b);
        assert_eq!(b[0], 0);
        dev.io_out(PORT_92, &[0x02]);
        dev.io_in(PORT_92, &mut b);
        assert_eq!(b[0], 0x02);
        let mut w = [0u8; 2];
        dev.io_in(0x40, &mut w);
        assert_eq!(w, [0xff, 0xff]);
    }

    #[test]
    fn transmit_interrupt_is_raised_and_survives_a_restore() {
        let (dev, _, probe) = sink();
        // Enable the "transmitter holding register empty" interrupt.
        dev.io_out(IER, &[0x02]);
        dev.io_out(COM1_BASE, b"x");
        assert!(probe.0.read().unwrap() >= 1, "an edge on IRQ 4");
        let state = dev.state();
        assert_eq!(state.uart.interrupt_enable, 0x02);
        let (other, _, other_probe) = sink();
        other.set_state(&state).unwrap();
        assert_eq!(other.state(), state);
        // Still pending after the restore: raised again at once.
        assert!(other_probe.0.read().unwrap() >= 1);
    }

    #[test]
    fn i8042_reset_is_seen_once() {
        let (dev, _, _) = sink();
        assert!(!dev.take_reset());
        dev.io_out(I8042_COMMAND, &[0xaa]);
        assert!(!dev.take_reset());
        dev.io_out(I8042_COMMAND, &[0xfe]);
        assert!(dev.take_reset());
        assert!(!dev.take_reset());
    }

    #[test]
    fn marker_is_found_across_writes() {
        let (dev, _, _) = sink();
        dev.watch_for(b"running");
        dev.io_out(COM1_BASE, b"not yet: runnin");
        assert!(!dev.marker_seen());
        dev.io_out(COM1_BASE, b"Xunning");
        assert!(!dev.marker_seen(), "the match restarts after a wrong byte");
        dev.io_out(COM1_BASE, b"rrunnin");
        assert!(!dev.marker_seen());
        dev.io_out(COM1_BASE, b"g\n");
        assert!(dev.marker_seen(), "a match may span writes");
        let state = dev.state();
        assert!(state.marker_seen);
    }

    #[test]
    fn state_round_trips() {
        let (dev, _, _) = sink();
        dev.io_out(PORT_92, &[0x02]);
        dev.io_out(COM1_BASE, b"xy");
        let state = dev.state();
        let (other, _, _) = sink();
        other.set_state(&state).unwrap();
        assert_eq!(other.state(), state);
        assert_eq!(other.serial_bytes(), 2);
    }
}
