//! memcpy, memmove, memset, memcmp and bcmp.
//!
//! The compiler emits calls to these, and for this host target
//! `compiler_builtins` expects libc to provide them. They are written in
//! assembly with string instructions (which KVM's emulator handles well and
//! which are free of vector registers), so LLVM cannot turn them back into
//! calls to themselves.

use core::arch::global_asm;

global_asm!(
    ".pushsection .text.mem, \"ax\"",
    // void *memcpy(void *dst, const void *src, size_t n)
    ".global memcpy",
    "memcpy:",
    "    movq %rdi, %rax",
    "    movq %rdx, %rcx",
    "    rep movsb",
    "    ret",
    // void *memmove(void *dst, const void *src, size_t n)
    ".global memmove",
    "memmove:",
    "    movq %rdi, %rax",
    "    movq %rdx, %rcx",
    "    cmpq %rsi, %rdi",
    "    jbe 1f",
    "    leaq -1(%rsi,%rdx), %rsi",
    "    leaq -1(%rdi,%rdx), %rdi",
    "    std",
    "    rep movsb",
    "    cld",
    "    ret",
    "1:",
    "    rep movsb",
    "    ret",
    // void *memset(void *dst, int c, size_t n)
    ".global memset",
    "memset:",
    "    movq %rdi, %r8",
    "    movl %esi, %eax",
    "    movq %rdx, %rcx",
    "    rep stosb",
    "    movq %r8, %rax",
    "    ret",
    // int memcmp(const void *a, const void *b, size_t n); bcmp is the same
    ".global memcmp",
    ".global bcmp",
    "memcmp:",
    "bcmp:",
    "    xorl %eax, %eax",
    "2:",
    "    testq %rdx, %rdx",
    "    jz 3f",
    "    movzbl (%rdi), %eax",
    "    movzbl (%rsi), %ecx",
    "    subl %ecx, %eax",
    "    jnz 3f",
    "    incq %rdi",
    "    incq %rsi",
    "    decq %rdx",
    "    jmp 2b",
    "3:",
    "    ret",
    ".popsection",
    options(att_syntax)
);
