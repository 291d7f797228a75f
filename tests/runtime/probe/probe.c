/* Calls the named syscalls with harmless arguments and prints "name errno-name" for each:
 * the seccomp and capability tests run it inside a container. Built statically by the tests. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static long call(const char *name) {
    if (!strcmp(name, "reboot")) return syscall(SYS_reboot, 0, 0, 0, 0);
    if (!strcmp(name, "mount")) return syscall(SYS_mount, "none", "/tmp", "tmpfs", 0, 0);
    if (!strcmp(name, "unshare")) return syscall(SYS_unshare, 0x00020000);
    if (!strcmp(name, "kexec_load")) return syscall(SYS_kexec_load, 0, 0, 0, 0);
    if (!strcmp(name, "init_module")) return syscall(SYS_init_module, 0, 0, "");
    if (!strcmp(name, "keyctl")) return syscall(SYS_keyctl, 0, 0, 0, 0, 0);
    if (!strcmp(name, "ptrace")) return syscall(SYS_ptrace, 16 /* ATTACH */, 1, 0, 0);
    if (!strcmp(name, "setns")) return syscall(SYS_setns, 0, 0);
    if (!strcmp(name, "getpid")) return syscall(SYS_getpid);
    if (!strcmp(name, "io_uring_setup")) {
        char params[120] = {0}; /* struct io_uring_params, all zero: a plain ring */
        return syscall(SYS_io_uring_setup, 1, params);
    }
    /* personality:VALUE, e.g. personality:0x40000; the old persona is restored after. */
    if (!strncmp(name, "personality:", 12)) {
        long old = syscall(SYS_personality, 0xffffffffUL);
        long r = syscall(SYS_personality, strtoul(name + 12, 0, 0));
        if (r >= 0) syscall(SYS_personality, (unsigned long)old);
        return r;
    }
    errno = ENOSYS;
    return -1;
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        errno = 0;
        long r = call(argv[i]);
        printf("%s %s\n", argv[i], r < 0 ? strerrorname_np(errno) : "OK");
    }
    return 0;
}
