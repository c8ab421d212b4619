/* stress: dirty a working set at a target rate, paced by the TSC.
 *
 * rdi: first page address, rsi: pages in the working set, rdx: pages per
 * second, rcx: TSC ticks per second, rbx: tick length in microseconds (0:
 * spin on the TSC without the sleep hypercall, which a PC does not have).
 * Each tick turns the elapsed TSC time into page credit (at most 0.1 s
 * worth, so a guest that was paused does not burst afterwards; the
 * fraction is kept in r13), then stamps the next pages round-robin with
 * counter + 1, like the software workload.
 */
#include "common.S"

        .globl _start
_start:
        INIT_HEADER
        mov     r15, rdx                /* pages per second */
        mov     rbp, rcx                /* TSC ticks per second */
        mov     rax, rcx
        xor     edx, edx
        mov     ecx, 10
        div     rcx
        mov     r14, rax                /* largest credited interval: 0.1 s */
        rdtsc
        shl     rdx, 32
        or      rax, rdx
        mov     r12, rax                /* TSC at the previous tick */
        xor     r13d, r13d              /* credit remainder, in page * TSC ticks */
tick:
        rdtsc
        shl     rdx, 32
        or      rax, rdx
        mov     rcx, rax
        sub     rcx, r12
        mov     r12, rax
        cmp     rcx, r14
        cmova   rcx, r14
        mov     rax, rcx
        mul     r15
        add     rax, r13
        adc     rdx, 0
        div     rbp
        mov     r13, rdx
        test    rax, rax
        jz      rest
        mov     rcx, rax
        mov     r8, qword ptr ds:HDR_COUNTER
        inc     r8
        mov     r9, qword ptr ds:HDR_CURSOR
1:      mov     rax, r9
        shl     rax, 12
        mov     qword ptr [rdi + rax], r8
        inc     r9
        cmp     r9, rsi
        jb      2f
        xor     r9d, r9d
2:      dec     rcx
        jnz     1b
        mov     qword ptr ds:HDR_CURSOR, r9
        mov     qword ptr ds:HDR_COUNTER, r8
rest:
        test    ebx, ebx
        jz      tick
        SLEEP_US ebx
        jmp     tick
