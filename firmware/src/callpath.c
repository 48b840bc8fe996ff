/*
 * callpath.c - a kernel-like system call path over a tiny in-memory VFS.
 *
 *   syscall_entry (NOKPROBE) -> enter_from_user_mode (noinstr)
 *     -> sys_dispatch(nr, args) -> sys_call_table[nr](args)   (indirect call)
 *        sys_open/sys_openat -> do_sys_open(dfd, filename, flags, mode)
 *            build_open_flags, getname -> getname_flags -> strncpy_from_user,
 *            get_unused_fd_flags -> alloc_fd,
 *            do_filp_open -> path_openat -> alloc_empty_file, path_init,
 *                link_path_walk -> walk_component -> lookup_fast,
 *                do_open -> lookup_fast / lookup_open, may_open, vfs_open
 *            fd_install / put_unused_fd, putname
 *        sys_newstat -> vfs_statx -> getname, filename_lookup ->
 *            path_lookupat -> path_init, link_path_walk, walk_component
 *        sys_read -> ksys_read -> fdget, vfs_read
 *        sys_write -> ksys_write -> fdget, vfs_write
 *        sys_close -> close_fd -> filp_close -> fput
 *        sys_lseek -> ksys_lseek
 *        unknown nr -> do_trap (NOKPROBE) -> handle_bad_syscall (__kprobes)
 *
 * main runs a fixed request list twice and prints one strace-like line per
 * request, e.g.  [0] open("/etc/passwd", 0x0, 0) = 3
 */
#include "platform.h"

#define EPERM 1
#define ENOENT 2
#define EBADF 9
#define ENOMEM 12
#define EACCES 13
#define EEXIST 17
#define ENOTDIR 20
#define EISDIR 21
#define EINVAL 22
#define EMFILE 24
#define ENOSPC 28
#define ESPIPE 29
#define ENAMETOOLONG 36
#define ENOSYS 38

#define O_ACCMODE 3
#define O_RDONLY 0
#define O_WRONLY 1
#define O_RDWR 2
#define O_CREAT 0100
#define O_EXCL 0200
#define O_TRUNC 01000
#define O_APPEND 02000
#define O_DIRECTORY 0200000
#define AT_FDCWD (-100)

#define SEEK_SET 0
#define SEEK_CUR 1
#define SEEK_END 2

#define S_IFMT 0170000
#define S_IFDIR 0040000
#define S_IFCHR 0020000
#define S_IFREG 0100000

#define MAY_WRITE 2
#define MAY_READ 4

#define PATH_MAX 64
#define NAME_LEN 16
#define NR_INODES 16
#define NR_FILES 12
#define NR_OPEN 10
#define TMP_DATA 32

#define MAX_ERRNO 4095
#define IS_ERR_VALUE(x) ((unsigned long)(x) >= (unsigned long)-MAX_ERRNO)

static inline void *ERR_PTR(long error)
{
	return (void *)error;
}

static inline long PTR_ERR(const void *ptr)
{
	return (long)ptr;
}

static inline int IS_ERR(const void *ptr)
{
	return IS_ERR_VALUE((unsigned long)ptr);
}

struct inode {
	u32 i_ino;
	u32 i_mode;
	u32 i_size;
	u32 i_parent; /* index of the parent directory */
	char i_name[NAME_LEN];
	const char *i_data;
	char *i_wdata; /* writable backing store (files created in /tmp) */
};

struct file {
	struct inode *f_inode;
	u32 f_flags;
	u32 f_mode; /* MAY_READ | MAY_WRITE */
	u32 f_pos;
	int f_count;
};

struct files_struct {
	struct file *fd[NR_OPEN];
	u32 open_fds; /* bitmap */
	u32 next_fd;
};

struct filename {
	const char *name; /* points to iname */
	const char *uptr; /* original "user" pointer */
	int refcnt;
	char iname[PATH_MAX];
};

struct open_flags {
	u32 open_flag;
	u32 mode;
	u32 acc_mode;
	u32 intent;
};

struct nameidata {
	struct inode *inode; /* current directory / final inode */
	const char *last;    /* last component */
	u32 last_len;
	u32 flags;
	u32 depth;
	int dfd;
};

/* --- the in-memory file system ------------------------------------------ */

static const char passwd_data[] =
	"root:x:0:0:root:/root:/bin/sh\n"
	"probe:x:1000:1000::/home/probe:/bin/sh\n";
static const char hostname_data[] = "kprobe-emu\n";
static const char version_data[] = "Linux version 6.12.0-kprobe-emu #1 SMP\n";

static struct inode inode_table[NR_INODES] = {
	{ 1, S_IFDIR | 0755, 0, 0, "/", NULL, NULL },
	{ 2, S_IFDIR | 0755, 0, 0, "etc", NULL, NULL },
	{ 3, S_IFREG | 0644, sizeof(passwd_data) - 1, 1, "passwd", passwd_data, NULL },
	{ 4, S_IFREG | 0644, sizeof(hostname_data) - 1, 1, "hostname", hostname_data, NULL },
	{ 5, S_IFDIR | 0755, 0, 0, "dev", NULL, NULL },
	{ 6, S_IFCHR | 0666, 0, 4, "null", NULL, NULL },
	{ 7, S_IFDIR | 01777, 0, 0, "tmp", NULL, NULL },
	{ 8, S_IFDIR | 0555, 0, 0, "proc", NULL, NULL },
	{ 9, S_IFREG | 0444, sizeof(version_data) - 1, 7, "version", version_data, NULL },
};
static u32 nr_inodes = 9;
static char tmp_data[4][TMP_DATA];
static u32 nr_tmp_data;

static struct file file_pool[NR_FILES];
static struct files_struct files;
static struct filename names_cache[2];
static u64 syscall_count;
static u64 trap_count;

/* --- getname ---------------------------------------------------------------- */

noinline long strncpy_from_user(char *dst, const char *src, long count)
{
	long i;

	for (i = 0; i < count; i++) {
		dst[i] = src[i];
		if (!src[i])
			return i;
	}
	return count;
}

noinline struct filename *getname_flags(const char *filename, int flags)
{
	struct filename *result = NULL;
	long len;
	unsigned i;

	for (i = 0; i < ARRAY_SIZE(names_cache); i++) {
		if (!names_cache[i].refcnt) {
			result = &names_cache[i];
			break;
		}
	}
	if (!result)
		return ERR_PTR(-ENOMEM);

	len = strncpy_from_user(result->iname, filename, PATH_MAX);
	if (len == PATH_MAX)
		return ERR_PTR(-ENAMETOOLONG);
	if (len == 0 && !(flags & 1))
		return ERR_PTR(-ENOENT);
	result->refcnt = 1;
	result->name = result->iname;
	result->uptr = filename;
	return result;
}

noinline struct filename *getname(const char *filename)
{
	return getname_flags(filename, 0);
}

noinline void putname(struct filename *name)
{
	if (IS_ERR(name))
		return;
	if (--name->refcnt == 0)
		name->name = NULL;
}

/* --- file descriptors ------------------------------------------------------- */

noinline int alloc_fd(unsigned start, unsigned end, unsigned flags)
{
	unsigned fd;

	(void)flags;
	if (start < files.next_fd)
		start = files.next_fd;
	for (fd = start; fd < end && fd < NR_OPEN; fd++) {
		if (!(files.open_fds & (1u << fd))) {
			files.open_fds |= 1u << fd;
			files.next_fd = fd + 1;
			return (int)fd;
		}
	}
	return -EMFILE;
}

noinline int get_unused_fd_flags(unsigned flags)
{
	return alloc_fd(0, NR_OPEN, flags);
}

noinline void put_unused_fd(unsigned fd)
{
	files.open_fds &= ~(1u << fd);
	if (fd < files.next_fd)
		files.next_fd = fd;
}

noinline void fd_install(unsigned fd, struct file *file)
{
	files.fd[fd] = file;
}

noinline struct file *fdget(unsigned fd)
{
	if (fd >= NR_OPEN)
		return NULL;
	return files.fd[fd];
}

noinline struct file *alloc_empty_file(u32 flags)
{
	unsigned i;

	for (i = 0; i < NR_FILES; i++) {
		if (!file_pool[i].f_count) {
			struct file *f = &file_pool[i];

			f->f_count = 1;
			f->f_flags = flags;
			f->f_pos = 0;
			f->f_inode = NULL;
			return f;
		}
	}
	return ERR_PTR(-ENOMEM);
}

noinline void fput(struct file *file)
{
	if (--file->f_count == 0)
		file->f_inode = NULL;
}

/* --- path walk ------------------------------------------------------------ */

noinline struct inode *lookup_fast(struct inode *dir, const char *name, u32 len)
{
	u32 parent = (u32)(dir - inode_table);
	u32 i;

	if (len == 1 && name[0] == '.')
		return dir;
	if (len == 2 && name[0] == '.' && name[1] == '.')
		return &inode_table[dir->i_parent];
	for (i = 1; i < nr_inodes; i++) {
		struct inode *in = &inode_table[i];

		if (in->i_parent == parent && !strncmp(in->i_name, name, len) &&
		    in->i_name[len] == 0)
			return in;
	}
	return NULL;
}

noinline int walk_component(struct nameidata *nd, const char *name, u32 len)
{
	struct inode *next;

	if ((nd->inode->i_mode & S_IFMT) != S_IFDIR)
		return -ENOTDIR;
	next = lookup_fast(nd->inode, name, len);
	if (!next)
		return -ENOENT;
	nd->inode = next;
	nd->depth++;
	return 0;
}

/* Walk every component but the last one; leave it in nd->last. */
noinline int link_path_walk(const char *name, struct nameidata *nd)
{
	for (;;) {
		const char *end;
		int err;

		while (*name == '/')
			name++;
		end = name;
		while (*end && *end != '/')
			end++;
		if (end - name >= NAME_LEN)
			return -ENAMETOOLONG;
		if (!*end || (*end == '/' && !end[1])) {
			nd->last = name;
			nd->last_len = (u32)(end - name);
			return 0;
		}
		err = walk_component(nd, name, (u32)(end - name));
		if (err)
			return err;
		name = end;
	}
}

noinline int path_init(struct nameidata *nd, const char *name, int dfd)
{
	nd->depth = 0;
	nd->dfd = dfd;
	if (name[0] == '/' || dfd == AT_FDCWD) {
		nd->inode = &inode_table[0]; /* root (cwd is "/") */
		return 0;
	}
	{
		struct file *f = fdget((unsigned)dfd);

		if (!f)
			return -EBADF;
		if ((f->f_inode->i_mode & S_IFMT) != S_IFDIR)
			return -ENOTDIR;
		nd->inode = f->f_inode;
	}
	return 0;
}

/* Resolve name completely (all components) into *res. */
noinline int path_lookupat(struct nameidata *nd, const char *name, u32 flags,
			   struct inode **res)
{
	int err;

	nd->flags = flags;
	err = path_init(nd, name, nd->dfd);
	if (err)
		return err;
	err = link_path_walk(name, nd);
	if (err)
		return err;
	if (nd->last_len) {
		err = walk_component(nd, nd->last, nd->last_len);
		if (err)
			return err;
	}
	*res = nd->inode;
	return 0;
}

noinline int filename_lookup(int dfd, struct filename *name, u32 flags,
			     struct inode **res)
{
	struct nameidata nd;

	memset(&nd, 0, sizeof(nd));
	nd.dfd = dfd;
	return path_lookupat(&nd, name->name, flags, res);
}

struct kstat {
	u64 ino;
	u64 mode;
	u64 size;
};

noinline int vfs_statx(int dfd, const char *filename, struct kstat *stat)
{
	struct filename *name = getname(filename);
	struct inode *inode;
	int err;

	if (IS_ERR(name))
		return (int)PTR_ERR(name);
	err = filename_lookup(dfd, name, 0, &inode);
	if (!err) {
		stat->ino = inode->i_ino;
		stat->mode = inode->i_mode;
		stat->size = inode->i_size;
	}
	putname(name);
	return err;
}

noinline struct inode *lookup_open(struct inode *dir, const char *name, u32 len,
				  u32 mode)
{
	struct inode *in;

	if (nr_inodes >= NR_INODES || nr_tmp_data >= ARRAY_SIZE(tmp_data))
		return ERR_PTR(-ENOSPC);
	in = &inode_table[nr_inodes];
	in->i_ino = nr_inodes + 1;
	in->i_mode = S_IFREG | (mode & 07777);
	in->i_size = 0;
	in->i_parent = (u32)(dir - inode_table);
	memcpy(in->i_name, name, len);
	in->i_name[len] = 0;
	in->i_wdata = tmp_data[nr_tmp_data++];
	in->i_data = in->i_wdata;
	nr_inodes++;
	return in;
}

noinline int may_open(struct inode *inode, u32 acc_mode, u32 flag)
{
	u32 mode = inode->i_mode;

	if ((mode & S_IFMT) == S_IFDIR && (acc_mode & MAY_WRITE))
		return -EISDIR;
	if ((flag & O_DIRECTORY) && (mode & S_IFMT) != S_IFDIR)
		return -ENOTDIR;
	if ((acc_mode & MAY_WRITE) && !(mode & 0222))
		return -EACCES;
	if ((acc_mode & MAY_READ) && !(mode & 0444))
		return -EACCES;
	return 0;
}

noinline int vfs_open(struct file *file, struct inode *inode)
{
	file->f_inode = inode;
	if ((file->f_flags & O_TRUNC) && inode->i_wdata)
		inode->i_size = 0;
	return 0;
}

noinline int do_open(struct nameidata *nd, struct file *file,
		     const struct open_flags *op)
{
	struct inode *dir = nd->inode;
	struct inode *inode = NULL;
	int err;

	if (nd->last_len) {
		if ((dir->i_mode & S_IFMT) != S_IFDIR)
			return -ENOTDIR;
		inode = lookup_fast(dir, nd->last, nd->last_len);
	} else {
		inode = dir;
	}
	if (inode && (op->open_flag & O_CREAT) && (op->open_flag & O_EXCL))
		return -EEXIST;
	if (!inode) {
		if (!(op->open_flag & O_CREAT))
			return -ENOENT;
		inode = lookup_open(dir, nd->last, nd->last_len, op->mode);
		if (IS_ERR(inode))
			return (int)PTR_ERR(inode);
	}
	err = may_open(inode, op->acc_mode, op->open_flag);
	if (err)
		return err;
	file->f_mode = op->acc_mode;
	return vfs_open(file, inode);
}

noinline struct file *path_openat(struct nameidata *nd, const struct open_flags *op,
				  const char *name)
{
	struct file *file;
	int err;

	file = alloc_empty_file(op->open_flag);
	if (IS_ERR(file))
		return file;
	err = path_init(nd, name, nd->dfd);
	if (!err)
		err = link_path_walk(name, nd);
	if (!err)
		err = do_open(nd, file, op);
	if (err) {
		fput(file);
		return ERR_PTR(err);
	}
	return file;
}

noinline struct file *do_filp_open(int dfd, struct filename *pathname,
				   const struct open_flags *op)
{
	struct nameidata nd;

	memset(&nd, 0, sizeof(nd));
	nd.dfd = dfd;
	return path_openat(&nd, op, pathname->name);
}

noinline int build_open_flags(int flags, u32 mode, struct open_flags *op)
{
	u32 acc;

	if ((flags & O_CREAT) && (flags & O_DIRECTORY))
		return -EINVAL;
	switch (flags & O_ACCMODE) {
	case O_RDONLY:
		acc = MAY_READ;
		break;
	case O_WRONLY:
		acc = MAY_WRITE;
		break;
	case O_RDWR:
		acc = MAY_READ | MAY_WRITE;
		break;
	default:
		return -EINVAL;
	}
	op->open_flag = (u32)flags;
	op->mode = (flags & O_CREAT) ? mode : 0;
	op->acc_mode = acc;
	op->intent = 0;
	return 0;
}

noinline long do_sys_open(int dfd, const char *filename, int flags, u32 mode)
{
	struct open_flags op;
	struct filename *tmp;
	struct file *f;
	int fd;

	fd = build_open_flags(flags, mode, &op);
	if (fd)
		return fd;
	tmp = getname(filename);
	if (IS_ERR(tmp))
		return PTR_ERR(tmp);
	fd = get_unused_fd_flags((u32)flags);
	if (fd >= 0) {
		f = do_filp_open(dfd, tmp, &op);
		if (IS_ERR(f)) {
			put_unused_fd((unsigned)fd);
			fd = (int)PTR_ERR(f);
		} else {
			fd_install((unsigned)fd, f);
		}
	}
	putname(tmp);
	return fd;
}

/* --- read / write / lseek / close ------------------------------------------ */

noinline long vfs_read(struct file *file, char *buf, u64 count)
{
	struct inode *inode = file->f_inode;
	u64 avail;

	if (!(file->f_mode & MAY_READ))
		return -EBADF;
	if ((inode->i_mode & S_IFMT) == S_IFDIR)
		return -EISDIR;
	if ((inode->i_mode & S_IFMT) == S_IFCHR)
		return 0;
	if (file->f_pos >= inode->i_size)
		return 0;
	avail = inode->i_size - file->f_pos;
	if (count > avail)
		count = avail;
	memcpy(buf, inode->i_data + file->f_pos, count);
	file->f_pos += (u32)count;
	return (long)count;
}

noinline long vfs_write(struct file *file, const char *buf, u64 count)
{
	struct inode *inode = file->f_inode;

	if (!(file->f_mode & MAY_WRITE))
		return -EBADF;
	if ((inode->i_mode & S_IFMT) == S_IFCHR)
		return (long)count;
	if (!inode->i_wdata)
		return -EPERM;
	if (file->f_flags & O_APPEND)
		file->f_pos = inode->i_size;
	if (file->f_pos + count > TMP_DATA)
		return -ENOSPC;
	memcpy(inode->i_wdata + file->f_pos, buf, count);
	file->f_pos += (u32)count;
	if (file->f_pos > inode->i_size)
		inode->i_size = file->f_pos;
	return (long)count;
}

noinline long ksys_read(unsigned fd, char *buf, u64 count)
{
	struct file *f = fdget(fd);

	if (!f)
		return -EBADF;
	return vfs_read(f, buf, count);
}

noinline long ksys_write(unsigned fd, const char *buf, u64 count)
{
	struct file *f = fdget(fd);

	if (!f)
		return -EBADF;
	return vfs_write(f, buf, count);
}

noinline long ksys_lseek(unsigned fd, s64 offset, unsigned whence)
{
	struct file *f = fdget(fd);
	s64 pos;

	if (!f)
		return -EBADF;
	if ((f->f_inode->i_mode & S_IFMT) == S_IFCHR)
		return -ESPIPE;
	switch (whence) {
	case SEEK_SET:
		pos = offset;
		break;
	case SEEK_CUR:
		pos = (s64)f->f_pos + offset;
		break;
	case SEEK_END:
		pos = (s64)f->f_inode->i_size + offset;
		break;
	default:
		return -EINVAL;
	}
	if (pos < 0)
		return -EINVAL;
	f->f_pos = (u32)pos;
	return pos;
}

noinline int filp_close(struct file *filp)
{
	fput(filp);
	return 0;
}

noinline int close_fd(unsigned fd)
{
	struct file *f = fdget(fd);

	if (!f)
		return -EBADF;
	files.fd[fd] = NULL;
	put_unused_fd(fd);
	return filp_close(f);
}

/* --- system call table ------------------------------------------------------- */

enum {
	NR_read,
	NR_write,
	NR_open,
	NR_close,
	NR_lseek,
	NR_getpid,
	NR_openat,
	NR_stat,
	NR_syscalls,
};

typedef long (*sys_call_ptr_t)(const u64 *args);

noinline long sys_read(const u64 *a)
{
	return ksys_read((unsigned)a[0], (char *)a[1], a[2]);
}

noinline long sys_write(const u64 *a)
{
	return ksys_write((unsigned)a[0], (const char *)a[1], a[2]);
}

noinline long sys_open(const u64 *a)
{
	return do_sys_open(AT_FDCWD, (const char *)a[0], (int)a[1], (u32)a[2]);
}

noinline long sys_openat(const u64 *a)
{
	return do_sys_open((int)a[0], (const char *)a[1], (int)a[2], (u32)a[3]);
}

noinline long sys_close(const u64 *a)
{
	return close_fd((unsigned)a[0]);
}

noinline long sys_lseek(const u64 *a)
{
	return ksys_lseek((unsigned)a[0], (s64)a[1], (unsigned)a[2]);
}

noinline long sys_newstat(const u64 *a)
{
	return vfs_statx(AT_FDCWD, (const char *)a[0], (struct kstat *)a[1]);
}

noinline long sys_getpid(const u64 *a)
{
	(void)a;
	return 1;
}

static const sys_call_ptr_t sys_call_table[NR_syscalls] = {
	[NR_read] = sys_read,
	[NR_write] = sys_write,
	[NR_open] = sys_open,
	[NR_close] = sys_close,
	[NR_lseek] = sys_lseek,
	[NR_getpid] = sys_getpid,
	[NR_openat] = sys_openat,
	[NR_stat] = sys_newstat,
};

static const char *const sys_names[NR_syscalls] = {
	"read", "write", "open", "close", "lseek", "getpid", "openat", "stat",
};

/* lives in .kprobes.text: the whole section is off limits to kprobes */
__kprobes long handle_bad_syscall(u64 nr)
{
	(void)nr;
	trap_count++;
	return -ENOSYS;
}

/* trap handler: blacklisted with NOKPROBE_SYMBOL */
noinline long do_trap(u64 nr, const u64 *args)
{
	(void)args;
	return handle_bad_syscall(nr);
}
NOKPROBE_SYMBOL(do_trap);

noinline long sys_dispatch(u64 nr, const u64 *args)
{
	if (nr >= NR_syscalls)
		return do_trap(nr, args);
	return sys_call_table[nr](args);
}

/* in .noinstr.text, like the kernel's entry code */
noinstr void enter_from_user_mode(void)
{
	syscall_count++;
}

/* the syscall entry stub: blacklisted with NOKPROBE_SYMBOL */
noinline long syscall_entry(u64 nr, const u64 *args)
{
	enter_from_user_mode();
	return sys_dispatch(nr, args);
}
NOKPROBE_SYMBOL(syscall_entry);

/* --- driver -------------------------------------------------------------- */

struct request {
	u64 nr;
	u64 args[4];
};

static char long_name[PATH_MAX + 16];
static char rbuf[96];
static struct kstat stbuf;

#define S(x) ((u64)(uintptr_t)(x))

static const struct request requests[] = {
	{ NR_open, { S("/etc/passwd"), O_RDONLY, 0 } },
	{ NR_read, { 3, S(rbuf), 16 } },
	{ NR_lseek, { 3, 5, SEEK_SET } },
	{ NR_read, { 3, S(rbuf), 12 } },
	{ NR_lseek, { 3, (u64)-8, SEEK_END } },
	{ NR_read, { 3, S(rbuf), 64 } },
	{ NR_open, { S("/etc/hostname"), O_RDONLY, 0 } },
	{ NR_read, { 4, S(rbuf), 64 } },
	{ NR_stat, { S("/etc/passwd"), S(&stbuf) } },
	{ NR_stat, { S("/proc/../etc/"), S(&stbuf) } },
	{ NR_stat, { S("/etc/shadow"), S(&stbuf) } },
	{ NR_open, { S("/nonexistent"), O_RDONLY, 0 } },
	{ NR_open, { S("/etc/passwd/x"), O_RDONLY, 0 } },
	{ NR_openat, { (u64)AT_FDCWD, S("etc/../proc/./version"), O_RDONLY, 0 } },
	{ NR_read, { 5, S(rbuf), 13 } },
	{ NR_open, { S("/etc"), O_RDONLY | O_DIRECTORY, 0 } },
	{ NR_openat, { 6, S("hostname"), O_RDONLY, 0 } },
	{ NR_read, { 7, S(rbuf), 6 } },
	{ NR_close, { 7 } },
	{ NR_close, { 6 } },
	{ NR_open, { S("/tmp/newfile"), O_CREAT | O_RDWR, 0644 } },
	{ NR_write, { 6, S("hello kprobes"), 13 } },
	{ NR_lseek, { 6, 6, SEEK_SET } },
	{ NR_read, { 6, S(rbuf), 32 } },
	{ NR_open, { S("/tmp/newfile"), O_CREAT | O_EXCL | O_WRONLY, 0600 } },
	{ NR_open, { S("/etc/passwd"), O_WRONLY, 0 } },
	{ NR_write, { 3, S("x"), 1 } },
	{ NR_write, { 7, S("x"), 1 } },
	{ NR_open, { S("/dev/null"), O_WRONLY, 0 } },
	{ NR_write, { 8, S("discard"), 7 } },
	{ NR_lseek, { 8, 0, SEEK_SET } },
	{ NR_open, { S("/dev/null"), O_RDONLY, 0 } },
	{ NR_open, { S("/dev/null"), O_RDONLY, 0 } },
	{ NR_close, { 3 } },
	{ NR_close, { 3 } },
	{ NR_open, { S(long_name), O_RDONLY, 0 } },
	{ NR_open, { S(""), O_RDONLY, 0 } },
	{ NR_open, { S("/tmp/x"), O_CREAT | O_DIRECTORY, 0 } },
	{ 99, { 1, 2, 3 } },
	{ NR_getpid, { 0 } },
	{ NR_close, { 4 } },
	{ NR_close, { 5 } },
	{ NR_close, { 6 } },
	{ NR_close, { 7 } },
	{ NR_close, { 8 } },
	{ NR_close, { 9 } },
	{ NR_close, { 42 } },
};

static void put_escaped(const char *s, u64 n)
{
	u64 i;

	putch('"');
	for (i = 0; i < n; i++) {
		if (s[i] == '\n')
			putstr("\\n");
		else if (s[i] == '"' || s[i] == '\\') {
			putch('\\');
			putch(s[i]);
		} else if (s[i] < 32 || s[i] > 126)
			putch('?');
		else
			putch(s[i]);
	}
	putch('"');
}

static void put_octal(u64 v)
{
	char buf[24];
	int i = sizeof(buf) - 1;

	buf[i] = 0;
	do {
		buf[--i] = (char)('0' + (v & 7));
		v >>= 3;
	} while (v);
	putstr(&buf[i]);
}

static void put_path(const char *s)
{
	u64 n = strlen(s);

	if (n > 24) {
		put_escaped(s, 12);
		putstr("...");
	} else {
		put_escaped(s, n);
	}
}

static void print_request(unsigned idx, const struct request *r, long ret)
{
	const u64 *a = r->args;

	putch('[');
	putu64(idx);
	putstr("] ");
	if (r->nr >= NR_syscalls) {
		putstr("syscall_");
		putu64(r->nr);
		putstr("(...)");
	} else {
		putstr(sys_names[r->nr]);
		putch('(');
		switch (r->nr) {
		case NR_open:
			put_path((const char *)a[0]);
			putstr(", ");
			puthex(a[1]);
			putstr(", 0");
			put_octal(a[2]);
			break;
		case NR_openat:
			puts64((s64)a[0]);
			putstr(", ");
			put_path((const char *)a[1]);
			putstr(", ");
			puthex(a[2]);
			putstr(", 0");
			put_octal(a[3]);
			break;
		case NR_read:
			putu64(a[0]);
			putstr(", ");
			if (ret > 0)
				put_escaped((const char *)a[1], (u64)ret);
			else
				putstr("\"\"");
			putstr(", ");
			putu64(a[2]);
			break;
		case NR_write:
			putu64(a[0]);
			putstr(", ");
			put_escaped((const char *)a[1], a[2]);
			putstr(", ");
			putu64(a[2]);
			break;
		case NR_lseek:
			putu64(a[0]);
			putstr(", ");
			puts64((s64)a[1]);
			putstr(", ");
			putu64(a[2]);
			break;
		case NR_close:
			putu64(a[0]);
			break;
		case NR_stat:
			put_path((const char *)a[0]);
			if (ret == 0) {
				const struct kstat *st = (const void *)a[1];

				putstr(", {ino=");
				putu64(st->ino);
				putstr(", mode=0");
				put_octal(st->mode);
				putstr(", size=");
				putu64(st->size);
				putstr("}");
			} else {
				putstr(", {}");
			}
			break;
		default:
			break;
		}
		putch(')');
	}
	putstr(" = ");
	puts64(ret);
	putnl();
}

static void callpath_reset(void)
{
	unsigned i;

	/* fds 0-2 are the console, as for a user process */
	memset(&files, 0, sizeof(files));
	memset(file_pool, 0, sizeof(file_pool));
	for (i = 0; i < 3; i++) {
		file_pool[i].f_inode = &inode_table[5]; /* /dev/null stands in */
		file_pool[i].f_count = 1;
		file_pool[i].f_mode = MAY_READ | MAY_WRITE;
		files.fd[i] = &file_pool[i];
		files.open_fds |= 1u << i;
	}
	files.next_fd = 3;
	memset(long_name, 'a', sizeof(long_name) - 1);
	long_name[0] = '/';
}

int callpath_main(int rounds)
{
	u64 sum = 0;
	long ret;
	int round, errors = 0;
	unsigned i;

	callpath_reset();
	for (round = 0; round < rounds; round++) {
		putstr("callpath: round ");
		putu64((u64)round);
		putnl();
		for (i = 0; i < ARRAY_SIZE(requests); i++) {
			ret = syscall_entry(requests[i].nr, requests[i].args);
			print_request(i, &requests[i], ret);
			if (ret < 0)
				errors++;
			sum = sum * 31 + (u64)ret;
		}
	}
	putstr("callpath: syscalls=");
	putu64(syscall_count);
	putkv("errors", (u64)errors);
	putkv("traps", trap_count);
	putkv("inodes", nr_inodes);
	putkx("sum", sum);
	putnl();
	return 0;
}

#ifndef IN_DEMO
int main(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	return callpath_main(2);
}
#endif
