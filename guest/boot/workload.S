/*
 * postcopy: the built-in workload of the KVM micro-VM, one 512-byte boot sector.
 *
 * Rebuild (from guest/boot/; guest/boot/check.sh checks that this reproduces
 * workload.bin byte for byte):
 *   as --32 -o /tmp/workload.o workload.S && ld -m elf_i386 -Ttext=0x7c00 --oformat binary -o workload.bin /tmp/workload.o
 *
 * Entry convention (set by KvmGuest::boot, as a PC BIOS hands over, without
 * BIOS services): real mode, CS:IP = 0000:7c00, DL = 0x80 (boot drive),
 * interrupts off, and ESI = RAM size in bytes (a postcopy convention; RAM is
 * one block at guest physical address 0, at most 3 GiB).
 *
 * What it does: enables A20 through port 0x92, loads a flat GDT, enters 32-bit
 * protected mode, zeroes the first byte of every 4 KiB page from 1 MiB to the
 * top of RAM, then forever increments the first byte of every page of that
 * range in ascending order and writes one marker byte 'B' to COM1 after each
 * pass (QEMU's migration-test "ab" pattern). It never enables interrupts.
 */

	.code16
	.text
	.globl	_start
_start:
	cli
	cld
	xorw	%ax, %ax
	movw	%ax, %ds
	movw	%ax, %es
	movw	%ax, %ss
	movw	$0x7c00, %sp

	/* RAM size: ESI survives the mode switch, but keep it in EBP. */
	movl	%esi, %ebp

	/* A20 through the fast gate; bit 0 (reset) must stay clear. */
	inb	$0x92, %al
	orb	$0x02, %al
	andb	$0xfe, %al
	outb	%al, $0x92

	lgdtl	gdt_desc
	movl	%cr0, %eax
	orl	$1, %eax
	movl	%eax, %cr0
	ljmpl	$CODE_SEL, $pm32

	.code32
pm32:
	movw	$DATA_SEL, %ax
	movw	%ax, %ds
	movw	%ax, %es
	movw	%ax, %fs
	movw	%ax, %gs
	movw	%ax, %ss
	movl	$0x7c00, %esp

	/* Top of the range: RAM size rounded down to a page. */
	andl	$0xfffff000, %ebp

	/* Zero the first byte of every page in [1 MiB, top). */
	movl	$0x100000, %ebx
zero_page:
	cmpl	%ebp, %ebx
	jae	pass
	movb	$0, (%ebx)
	addl	$0x1000, %ebx
	jmp	zero_page

	/* One pass: increment every page's first byte, ascending. */
pass:
	movl	$0x100000, %ebx
inc_page:
	cmpl	%ebp, %ebx
	jae	marker
	incb	(%ebx)
	addl	$0x1000, %ebx
	jmp	inc_page

	/* One marker per pass on COM1, once the transmitter is empty. */
marker:
	movw	$0x3fd, %dx
wait_thre:
	inb	%dx, %al
	testb	$0x20, %al
	jz	wait_thre
	movw	$0x3f8, %dx
	movb	$'B', %al
	outb	%al, %dx
	jmp	pass

	.set	CODE_SEL, 0x08
	.set	DATA_SEL, 0x10

	.p2align 3
gdt:
	.quad	0			/* null */
	.quad	0x00cf9a000000ffff	/* 0x08: code, base 0, 4 GiB, 32-bit, read/exec */
	.quad	0x00cf92000000ffff	/* 0x10: data, base 0, 4 GiB, read/write */
gdt_end:
gdt_desc:
	.word	gdt_end - gdt - 1
	.long	gdt

	.org	510
	.byte	0x55, 0xaa
