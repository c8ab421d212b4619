/* Shared by the guest programs and the Python loader (boot.py reads these #defines).
 *
 * Guest-physical layout (identity-mapped with 2 MiB user pages):
 *   0x0000   header page: magic, pass counter, cursor, result (read by tools through the RAM file)
 *   0x1000   GDT, then the TSS and its I/O permission bitmap; boot arguments at 0x1800
 *   0x2000   page tables: PML4, PDPT, then one page directory per GiB (at least 4 GiB mapped)
 *   0x20000  program code, entry first
 *   ...      stack, growing down from 0x80000 (a PC's RAM ends at 0xA0000: VGA and ROMs above)
 *   1 MiB    the programs' working memory
 */
#define GDT_BASE        0x1000
#define GDT_ENTRIES     7                       /* null, kernel code/data, user data/code, TSS (2) */
#define TSS_BASE        0x1080
#define PML4_BASE       0x2000
#define PDPT_BASE       0x3000
#define PD_BASE         0x4000
#define BOOT_ARGS       0x1800                  /* rip, rsp, rdi, rsi, rdx, rcx, rbx: read by bios.S */
#define CODE_BASE       0x20000
#define STACK_TOP       0x80000
#define WORK_BASE       0x100000

#define SEL_KERNEL_CODE 0x08
#define SEL_KERNEL_DATA 0x10
#define SEL_USER_DATA   0x1b
#define SEL_USER_CODE   0x23
#define SEL_TSS         0x28
#define IO_PORTS        0x800                   /* the TSS I/O bitmap allows ports below this at CPL 3 */

#define HEADER_MAGIC    0x4554415247494d56      /* "VMIGRATE" */
#define HDR_COUNTER     8
#define HDR_CURSOR      16
#define HDR_RESULT      24
#define UART_BASE       0x3f8
#define UART_LSR        0x3fd
#define LSR_THRE        0x20
#define PORT_SLEEP_US   0x700                   /* out dx, eax: the vCPU sleeps eax microseconds */
#define PAGE_SIZE       4096
