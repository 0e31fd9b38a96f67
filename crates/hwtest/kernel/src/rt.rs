//! The little runtime a `no_std` binary without libc needs: the memory
//! functions the compiler calls, a bump allocator for `alloc`, and the panic
//! handler.

use core::alloc::{GlobalAlloc, Layout};
use core::arch::global_asm;
use core::sync::atomic::{AtomicUsize, Ordering};

use crate::layout;

// memcpy/memmove/memset/memcmp/bcmp in assembly, so that the compiler cannot
// turn their loops back into calls to themselves.
global_asm!(
    r#"
    .section .text.memfns, "ax"
    .global memcpy
memcpy:
    movq %rdi, %rax
    movq %rdx, %rcx
    rep movsb
    ret
    .global memmove
memmove:
    movq %rdi, %rax
    movq %rdx, %rcx
    cmpq %rsi, %rdi
    jbe 1f
    leaq -1(%rsi,%rdx), %rsi
    leaq -1(%rdi,%rdx), %rdi
    std
    rep movsb
    cld
    ret
1:  rep movsb
    ret
    .global memset
memset:
    movq %rdi, %r9
    movl %esi, %eax
    movq %rdx, %rcx
    rep stosb
    movq %r9, %rax
    ret
    .global memcmp
    .global bcmp
memcmp:
bcmp:
    xorl %eax, %eax
2:  testq %rdx, %rdx
    jz 3f
    movzbl (%rdi), %eax
    movzbl (%rsi), %ecx
    subl %ecx, %eax
    jnz 3f
    incq %rdi
    incq %rsi
    decq %rdx
    jmp 2b
3:  ret
"#,
    options(att_syntax)
);

/// Bump allocator over the fixed heap region; `dealloc` is a no-op. The
/// kernel runs one suite and exits, so leaking is the simplest correct policy.
struct Bump {
    next: AtomicUsize,
}

// SAFETY: allocations are carved from a region nothing else uses
// (layout::HEAP), aligned as asked, never handed out twice; the single CPU
// runs no interrupt handlers, and the CAS loop keeps it correct regardless.
unsafe impl GlobalAlloc for Bump {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let mut cur = self.next.load(Ordering::Relaxed);
        loop {
            let start = (layout::HEAP_BASE as usize + cur).next_multiple_of(l.align());
            let end = start + l.size();
            if end > (layout::HEAP_BASE + layout::HEAP_SIZE) as usize {
                return core::ptr::null_mut();
            }
            let new = end - layout::HEAP_BASE as usize;
            match self.next.compare_exchange(cur, new, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return start as *mut u8,
                Err(c) => cur = c,
            }
        }
    }
    unsafe fn dealloc(&self, _p: *mut u8, _l: Layout) {}
}

#[global_allocator]
static ALLOC: Bump = Bump { next: AtomicUsize::new(0) };

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    crate::kprintln!("PANIC {}", info);
    crate::kprintln!("END FAIL");
    crate::io::exit(3)
}
