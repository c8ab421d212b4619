/* ab: QEMU's migration-test guest in 64-bit user mode.
 *
 * Each pass increments the pass counter, then byte 0 of every page of
 * [rdi, rsi), then writes one letter ('a' + pass % 26) to the UART and
 * sleeps rbx microseconds.  Counting first means that, whenever the guest
 * stops, every page shows the pass count or one less.
 */
#include "common.S"

        .globl _start
_start:
        INIT_HEADER
pass:
        inc     qword ptr ds:HDR_COUNTER
        mov     rcx, rdi
1:      inc     byte ptr [rcx]
        add     rcx, PAGE_SIZE
        cmp     rcx, rsi
        jb      1b
        push    rdi
        mov     rax, qword ptr ds:HDR_COUNTER
        xor     edx, edx
        mov     ecx, 26
        div     rcx
        lea     edi, [rdx + 'a']
        call    putc
        pop     rdi
        test    ebx, ebx
        jz      pass
        SLEEP_US ebx
        jmp     pass

        DEFINE_PUTC
