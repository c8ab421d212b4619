/* Included first by every guest program: header set-up, UART output, sleep hypercall.
 *
 * The programs run entirely at CPL 3: the VMM starts the vCPU there.  Port
 * I/O reaches the VMM because the TSS's I/O permission bitmap allows the
 * UART and hypercall ports (IOPL is not honoured for user mode on every
 * host: PVM ignores it).
 */
#include "guest.h"
        .intel_syntax noprefix
        .code64

/* Write the header once: a migrated guest finds it already set and keeps its counters. */
.macro INIT_HEADER
        movabs  rax, HEADER_MAGIC
        cmp     qword ptr ds:0, rax
        je      .Lheader_done\@
        mov     qword ptr ds:0, rax
        mov     qword ptr ds:HDR_COUNTER, 0
        mov     qword ptr ds:HDR_CURSOR, 0
.Lheader_done\@:
.endm

/* Sleep \us microseconds (a register or an immediate) through the VMM; clobbers rax, rdx. */
.macro SLEEP_US us
        mov     eax, \us
        mov     edx, PORT_SLEEP_US
        out     dx, eax
.endm

/* putc: write dil to the UART once its transmitter is empty; clobbers rax, rdx. */
.macro DEFINE_PUTC
putc:
        mov     edx, UART_LSR
.Lputc_wait:
        in      al, dx
        test    al, LSR_THRE
        jz      .Lputc_wait
        mov     edx, UART_BASE
        mov     eax, edi
        out     dx, al
        ret
.endm
