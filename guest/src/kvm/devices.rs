//! The micro-VM's only devices, all port I/O handled in user space: the
//! transmit side of a COM1 UART (enough for polling guests to print) and the
//! port 0x92 "fast A20" register. Every other port reads 0xff and swallows
//! writes; MMIO outside RAM does the same.

use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;

/// COM1's data register (transmit holding register when DLAB is clear).
pub const COM1_DATA: u16 = 0x3f8;
/// COM1's line control register: bit 7 (DLAB) turns the data port into the
/// divisor latch, so baud-rate setup must not count as output.
const COM1_LCR: u16 = 0x3fb;
/// COM1's line status register.
const COM1_LSR: u16 = 0x3fd;
const COM1_LAST: u16 = 0x3ff;
/// LSR: transmit holding register empty (0x20) and transmitter empty (0x40).
const LSR_TX_IDLE: u8 = 0x60;
const LCR_DLAB: u8 = 0x80;
/// System control port A: bit 1 gates A20, bit 0 would reset the machine.
const PORT_92: u16 = 0x92;

/// What the devices remember, carried in the saved state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    pub port92: u8,
    pub com1_lcr: u8,
    /// Bytes the guest has written to COM1 since it booted, on every host.
    pub serial_bytes: u64,
}

/// The device model shared by all vCPU threads.
#[derive(Debug)]
pub struct Devices {
    serial: Mutex<File>,
    serial_bytes: AtomicU64,
    /// Logged once so a broken serial sink does not flood the log.
    serial_error_logged: AtomicBool,
    com1_lcr: AtomicU8,
    port92: AtomicU8,
    unknown_port_logged: AtomicBool,
    mmio_logged: AtomicBool,
}

impl Devices {
    pub fn new(serial: File) -> Self {
        Devices {
            serial: Mutex::new(serial),
            serial_bytes: AtomicU64::new(0),
            serial_error_logged: AtomicBool::new(false),
            com1_lcr: AtomicU8::new(0),
            port92: AtomicU8::new(0),
            unknown_port_logged: AtomicBool::new(false),
            mmio_logged: AtomicBool::new(false),
        }
    }

    pub fn serial_bytes(&self) -> u64 {
        self.serial_bytes.load(Ordering::SeqCst)
    }

    pub fn state(&self) -> DeviceState {
        DeviceState {
            port92: self.port92.load(Ordering::SeqCst),
            com1_lcr: self.com1_lcr.load(Ordering::SeqCst),
            serial_bytes: self.serial_bytes(),
        }
    }

    pub fn set_state(&self, state: &DeviceState) {
        self.port92.store(state.port92, Ordering::SeqCst);
        self.com1_lcr.store(state.com1_lcr, Ordering::SeqCst);
        self.serial_bytes
            .store(state.serial_bytes, Ordering::SeqCst);
    }

    /// An OUT (or OUTS) of `data` to `port`. A string OUT to the data port
    /// arrives as several bytes for the same port, so every byte counts.
    pub fn io_out(&self, port: u16, data: &[u8]) {
        let Some(&first) = data.first() else { return };
        match port {
            COM1_DATA if self.com1_lcr.load(Ordering::Relaxed) & LCR_DLAB == 0 => {
                self.serial_out(data)
            }
            COM1_LCR => self.com1_lcr.store(first, Ordering::Relaxed),
            PORT_92 => self.port92.store(first, Ordering::Relaxed),
            COM1_DATA..=COM1_LAST => {}
            _ => self.log_unknown_port(port, "write"),
        }
    }

    /// An IN from `port`: fills `data`.
    pub fn io_in(&self, port: u16, data: &mut [u8]) {
        let value = match port {
            COM1_LSR => LSR_TX_IDLE,
            COM1_DATA..=COM1_LAST => 0,
            PORT_92 => self.port92.load(Ordering::Relaxed),
            _ => {
                self.log_unknown_port(port, "read");
                0xff
            }
        };
        data.fill(value);
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

    fn serial_out(&self, data: &[u8]) {
        // Counted even if the sink fails: the count is the guest's progress,
        // not the file's.
        self.serial_bytes
            .fetch_add(data.len() as u64, Ordering::SeqCst);
        let mut file = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = file.write_all(data) {
            if !self.serial_error_logged.swap(true, Ordering::Relaxed) {
                log::error!("cannot write guest serial output: {e} (logged once)");
            }
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

    fn sink() -> (Devices, File) {
        let fd: OwnedFd = common::mem::create_memfd("serial-test", 0).unwrap();
        let file = File::from(fd);
        let reader = file.try_clone().unwrap();
        (Devices::new(file), reader)
    }

    #[test]
    fn serial_counts_and_writes_data_bytes_only() {
        let (dev, mut reader) = sink();
        dev.io_out(COM1_DATA, b"a");
        // Baud-rate setup: DLAB on, divisor bytes, DLAB off.
        dev.io_out(COM1_LCR, &[0x83]);
        dev.io_out(COM1_DATA, &[0x01]);
        dev.io_out(COM1_DATA + 1, &[0x00]);
        dev.io_out(COM1_LCR, &[0x03]);
        dev.io_out(COM1_DATA, b"bc");
        assert_eq!(dev.serial_bytes(), 3);
        let mut out = String::new();
        reader.rewind().unwrap();
        reader.read_to_string(&mut out).unwrap();
        assert_eq!(out, "abc");
    }

    #[test]
    fn port_reads() {
        let (dev, _) = sink();
        let mut b = [0u8; 1];
        dev.io_in(COM1_LSR, &mut b);
        assert_eq!(b[0], 0x60);
        dev.io_in(COM1_DATA, &mut b);
        assert_eq!(b[0], 0);
        dev.io_in(0x60, &mut b);
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
    fn state_round_trips() {
        let (dev, _) = sink();
        dev.io_out(PORT_92, &[0x02]);
        dev.io_out(COM1_DATA, b"xy");
        let state = dev.state();
        let (other, _) = sink();
        other.set_state(&state);
        assert_eq!(other.state(), state);
        assert_eq!(other.serial_bytes(), 2);
    }
}
