/* checksum: a long computation over guest memory, its result printed on the UART.
 *
 * rdi: base address, rsi: number of 64-bit words, rdx: rounds.
 *   fill:   w[i] = x ^ (x >> 32) with x = (i + 1) * 0x9e3779b97f4a7c15
 *   round r = 1..rounds, every word:  w ^= w >> 31; w *= 0xbf58476d1ce4e5b9; w += r
 *   result: sum of w[i] * (2i + 1) (mod 2^64), stored in the header and
 *           printed as "checksum %016x\n"
 * The header counter holds the rounds done, rounds + 1 once the result is out.  All state is in registers and
 * guest RAM, so a migration in the middle must not change the result.
 */
#include "common.S"

        .globl _start
_start:
        INIT_HEADER
        mov     r12, rdx                /* rounds */
        movabs  r13, 0x9e3779b97f4a7c15
        movabs  r14, 0xbf58476d1ce4e5b9
        xor     ecx, ecx
1:      lea     rax, [rcx + 1]
        imul    rax, r13
        mov     rdx, rax
        shr     rdx, 32
        xor     rax, rdx
        mov     [rdi + rcx * 8], rax
        inc     rcx
        cmp     rcx, rsi
        jb      1b
        mov     r15, 1                  /* round number */
round:
        cmp     r15, r12
        ja      result
        xor     ecx, ecx
2:      mov     rax, [rdi + rcx * 8]
        mov     rdx, rax
        shr     rdx, 31
        xor     rax, rdx
        imul    rax, r14
        add     rax, r15
        mov     [rdi + rcx * 8], rax
        inc     rcx
        cmp     rcx, rsi
        jb      2b
        mov     qword ptr ds:HDR_COUNTER, r15
        inc     r15
        jmp     round
result:
        xor     ebx, ebx
        xor     ecx, ecx
3:      mov     rax, [rdi + rcx * 8]
        lea     rdx, [rcx + rcx + 1]
        imul    rax, rdx
        add     rbx, rax
        inc     rcx
        cmp     rcx, rsi
        jb      3b
        mov     qword ptr ds:HDR_RESULT, rbx
        lea     r13, [rip + label]
4:      movzx   edi, byte ptr [r13]
        test    edi, edi
        jz      5f
        call    putc
        inc     r13
        jmp     4b
5:      mov     r13d, 16
6:      rol     rbx, 4
        mov     edi, ebx
        and     edi, 15
        lea     rax, [rip + hexdigits]
        movzx   edi, byte ptr [rax + rdi]
        call    putc
        dec     r13d
        jnz     6b
        mov     edi, '\n'
        call    putc
        inc     qword ptr ds:HDR_COUNTER  /* rounds + 1: finished */
done:
        SLEEP_US 1000000
        jmp     done

        DEFINE_PUTC
label:
        .asciz  "checksum "
hexdigits:
        .ascii  "0123456789abcdef"
