/* bios: the firmware that starts a guest program on a PC (QEMU's -bios), from reset to CPL 3.
 *
 * vmigrate's KVM backend starts a program already in 64-bit user mode
 * (KVM_SET_SREGS).  A PC starts in real mode at 0xFFFFFFF0 instead, so this
 * ROM walks the same way in code: protected mode, long mode on the page
 * tables the loader wrote into RAM (boot.py), the loader's GDT and TSS, then
 * iretq into the program with the registers of the boot arguments.  RAM is
 * prepared by the same loader for both machines, so both run the same bytes.
 *
 * Linked at 0xFFFF0000: a 64 KiB ROM ending at 4 GiB, which the loader's
 * page tables map, so the code keeps running once paging is on.
 */
#include "guest.h"
        .set    ROM_BASE, 0xffff0000
        .set    CR0_LONG, 0x80050033    /* PG AM WP NE ET MP PE: the loader's CR0 */
        .set    CR4_LONG, 0x620         /* OSXMMEXCPT OSFXSR PAE */
        .set    MSR_EFER, 0xc0000080
        .set    EFER_LME, 0x100
        .set    ROM_CODE32, 0x08
        .set    ROM_DATA, 0x10
        .set    ROM_CODE64, 0x18

        .text
        .code16
        .globl  _start
_start:
        cli
        lgdtl   %cs:(rom_gdt_ptr - ROM_BASE)
        mov     %cr0, %eax
        or      $1, %eax
        mov     %eax, %cr0
        ljmpl   $ROM_CODE32, $protected

        .code32
protected:
        mov     $ROM_DATA, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     $CR4_LONG, %eax
        mov     %eax, %cr4
        mov     $PML4_BASE, %eax
        mov     %eax, %cr3
        mov     $MSR_EFER, %ecx
        rdmsr
        or      $EFER_LME, %eax
        wrmsr
        mov     $CR0_LONG, %eax
        mov     %eax, %cr0
        ljmp    $ROM_CODE64, $long

        .code64
long:
        mov     $STACK_TOP, %esp
        lgdt    ram_gdt_ptr(%rip)
        /* ltr wants an available TSS; the loader wrote it busy, as a running CPU holds it. */
        andb    $~2, GDT_BASE + SEL_TSS + 5
        mov     $SEL_TSS, %ax
        ltr     %ax
        mov     $SEL_USER_DATA, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %fs
        mov     %ax, %gs
        pushq   $SEL_USER_DATA
        pushq   BOOT_ARGS + 8           /* rsp */
        pushq   $2                      /* rflags: interrupts off */
        pushq   $SEL_USER_CODE
        pushq   BOOT_ARGS               /* rip */
        mov     BOOT_ARGS + 16, %rdi
        mov     BOOT_ARGS + 24, %rsi
        mov     BOOT_ARGS + 32, %rdx
        mov     BOOT_ARGS + 40, %rcx
        mov     BOOT_ARGS + 48, %rbx
        iretq

        .balign 8
rom_gdt:
        .quad   0
        .quad   0x00cf9b000000ffff      /* flat 32-bit code */
        .quad   0x00cf93000000ffff      /* flat data */
        .quad   0x00af9b000000ffff      /* 64-bit code */
rom_gdt_ptr:
        .word   rom_gdt_ptr - rom_gdt - 1
        .long   rom_gdt
ram_gdt_ptr:
        .word   GDT_ENTRIES * 8 - 1
        .quad   GDT_BASE

        .code16
        .org    0xfff0                  /* the reset vector, 16 bytes below 4 GiB */
        jmp     _start
        .org    0x10000
