/*
 * postcopy: a boot sector that lives on interrupts, for the VMM's tests of
 * the PIT, the PIC and the UART's interrupt (guest/tests/kvm_vmm.rs,
 * interrupts_survive_save_restore). Not a workload.
 *
 * Rebuild (from guest/boot/; check.sh compares it with interrupts.bin):
 *   as --32 -o /tmp/interrupts.o interrupts.S && ld -m elf_i386 -Ttext=0x7c00 --oformat binary -o interrupts.bin /tmp/interrupts.o
 *
 * What it does, in real mode: programs the master PIC (vectors 0x08-0x0f,
 * only IRQ 0 and IRQ 4 unmasked) and masks the slave, programs PIT channel 0
 * as a rate generator at about 100 Hz, then keeps incrementing the first
 * byte of every page from 64 KiB to 636 KiB with interrupts on. Every
 * 25th timer tick (IRQ 0) enables the UART's "transmitter holding register
 * empty" interrupt; that interrupt (IRQ 4) writes one 'U' to COM1 and
 * disables it again. So each 'U' on the serial port is a PIT tick and a UART
 * interrupt delivered through KVM's PIC: about four a second, and none at
 * all if the PIT, the PIC or the UART lost its programming.
 */

	.code16
	.text
	.globl	_start
_start:
	cli
	xorw	%ax, %ax
	movw	%ax, %ds
	movw	%ax, %ss
	movw	$0x7c00, %sp

	/* Interrupt vectors 0x08 (IRQ 0) and 0x0c (IRQ 4). */
	movw	$timer, 0x08*4
	movw	%ax, 0x08*4+2
	movw	$uart, 0x0c*4
	movw	%ax, 0x0c*4+2

	/* Master PIC: ICW1 (edge, cascade, ICW4), ICW2 base 0x08, ICW3 slave
	 * on IRQ 2, ICW4 8086 mode; mask all but IRQ 0 and IRQ 4. */
	movb	$0x11, %al
	outb	%al, $0x20
	movb	$0x08, %al
	outb	%al, $0x21
	movb	$0x04, %al
	outb	%al, $0x21
	movb	$0x01, %al
	outb	%al, $0x21
	movb	$0xee, %al
	outb	%al, $0x21
	/* Slave PIC: base 0x70, on master's IRQ 2, all masked. */
	movb	$0x11, %al
	outb	%al, $0xa0
	movb	$0x70, %al
	outb	%al, $0xa1
	movb	$0x02, %al
	outb	%al, $0xa1
	movb	$0x01, %al
	outb	%al, $0xa1
	movb	$0xff, %al
	outb	%al, $0xa1

	/* PIT channel 0, lobyte/hibyte, mode 2; divisor 11932: ~100 Hz. */
	movb	$0x34, %al
	outb	%al, $0x43
	movw	$11932, %ax
	outb	%al, $0x40
	movb	%ah, %al
	outb	%al, $0x40

	/* UART: 8N1, all its interrupts off, OUT2 set (a PC's UART drives its
	 * IRQ line only with OUT2). */
	movw	$0x3fb, %dx
	movb	$0x03, %al
	outb	%al, %dx
	movw	$0x3f9, %dx
	xorb	%al, %al
	outb	%al, %dx
	movw	$0x3fc, %dx
	movb	$0x08, %al
	outb	%al, %dx

	sti
	/* Between interrupts: increment the first byte of every page from
	 * 64 KiB to 636 KiB, pass after pass, so the guest dirties memory
	 * like a working one (and a migration of it cannot converge on a slow
	 * link). */
busy:
	movw	$0x1000, %bx
1:	movw	%bx, %es
	incb	%es:0
	addw	$0x100, %bx
	cmpw	$0x9f00, %bx
	jb	1b
	jmp	busy

timer:
	pushw	%ax
	pushw	%dx
	incb	ticks
	cmpb	$25, ticks
	jb	1f
	movb	$0, ticks
	/* Enable "transmitter holding register empty": it is empty, so the
	 * UART raises IRQ 4 at once. */
	movw	$0x3f9, %dx
	movb	$0x02, %al
	outb	%al, %dx
1:	movb	$0x20, %al
	outb	%al, $0x20
	popw	%dx
	popw	%ax
	iret

uart:
	pushw	%ax
	pushw	%dx
	/* Read IIR (acknowledges the THR-empty interrupt), turn the
	 * interrupt off until the next 25 ticks (first, so the byte written
	 * next raises no second one), write the marker. */
	movw	$0x3fa, %dx
	inb	%dx, %al
	movw	$0x3f9, %dx
	xorb	%al, %al
	outb	%al, %dx
	movw	$0x3f8, %dx
	movb	$'U', %al
	outb	%al, %dx
	movb	$0x20, %al
	outb	%al, $0x20
	popw	%dx
	popw	%ax
	iret

ticks:
	.byte	0

	.org	510
	.byte	0x55, 0xaa
