/*
 * labvm_merge: applies an overlay upper layer onto a copy of its lower layer, in place.
 *
 *     labvm_merge apply [--jobs N] [--stats] [--below DIR | --flatten] UPPER TARGET
 *
 * TARGET is a fresh copy of the lower layer (a MooseFS snapshot); UPPER is a copy of the upper
 * layer as the sync writes it: plain files, whiteouts as 0/0 character devices (or zero-size
 * files with trusted.overlay.whiteout), opaque directories marked trusted.overlay.opaque="y".
 * UPPER is used up: entries move from it into TARGET with rename(2), so no file data is copied
 * and every hard link, sparse file, device node and symlink keeps its inode as it was. What
 * TARGET loses (deleted names, entries of another type) moves into UPPER.trash, a directory the
 * apply creates beside UPPER: one rename, however big a deleted tree is. The trash lies outside
 * both trees, so no name a member gives a file can meet it. Delete UPPER and UPPER.trash after
 * the apply.
 *
 * A desktop's version is not its whole root but a layer over the shared desktop image
 * (lowerdir=low_local:xfce_local). TARGET becomes UPPER and TARGET squashed into one layer
 * which, mounted over the image, shows what UPPER over TARGET over the image showed. So where
 * the image has something to hide, a whiteout stays a whiteout (a file the member deleted)
 * and a directory that hid all below it stays, or becomes, opaque. Anywhere else whiteouts
 * and opaque markers are dropped: the kernel hides a whiteout only in a directory that merges
 * with one below it, so a needless whiteout would show as a name that cannot be opened.
 *   --below DIR  the layer TARGET will lie on (the image): decides exactly, by looking there
 *   --flatten    nothing will lie below: TARGET becomes the kernel's view of UPPER over TARGET
 *                as plain files, without any whiteout or opaque marker
 *   neither      unknown: every whiteout and opaque marker is kept
 *
 * On MooseFS every metadata call is a round trip to the master, so --jobs workers take
 * directories from a shared stack. A merged directory takes its owner and xattrs when its
 * work starts, its mode and times only after all its children are done: moving entries in
 * changes its mtime. A directory waiting for its children then needs only its TARGET
 * descriptor (its UPPER and below ones are closed once every child has opened its own), so a
 * deep tree costs one descriptor per level.
 *
 * Upper layers written with redirect_dir or metacopy are refused: their entries point into
 * the lower layer by xattr, and publishing them as plain files would lose data.
 *
 * A trusted.overlay.X xattr a member sets through the overlay (Linux 6.7 and later) is stored
 * escaped, as trusted.overlay.overlay.X, and overlayfs shows it back as trusted.overlay.X from
 * any layer, lower ones too. It is the member's own xattr, not overlay's bookkeeping: it is
 * published verbatim, never read as a marker.
 *
 * Exit status: 0 done, 1 failed (a message on stderr names the path), 2 usage.
 * LABVM_MERGE_CRASH_AFTER=K kills the process with SIGKILL just before its K-th change to
 * either tree, so tests can check what a crash at any point leaves behind.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

#define EXIT_USAGE 2
#define DEFAULT_JOBS 8
#define MAX_JOBS 64

#define OVERLAY_PREFIX "trusted.overlay."
#define OVERLAY_ESCAPED_PREFIX "trusted.overlay.overlay."
#define OVERLAY_OPAQUE "trusted.overlay.opaque"
#define OVERLAY_WHITEOUT "trusted.overlay.whiteout"
#define OVERLAY_REDIRECT "trusted.overlay.redirect"
#define OVERLAY_METACOPY "trusted.overlay.metacopy"
#define TRASH_SUFFIX ".trash"

#define XATTR_LIST_BYTES 65536 /* XATTR_LIST_MAX: one listxattr call is always enough */
#define XATTR_VALUE_BYTES 65536 /* XATTR_SIZE_MAX */
#define PROC_PATH_BYTES (32 + NAME_MAX + 1)
#define MESSAGE_BYTES 8192

#define DIR_OPEN_FLAGS (O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)

/* What lies below TARGET at a directory, in the stack TARGET will be mounted in: a descriptor
 * on the --below layer's directory there, or one of these. */
#define BELOW_UNKNOWN (-2) /* no --below: anything may, so every whiteout and opaque marker stays */
#define BELOW_NONE (-1)    /* nothing: a whiteout or opaque marker here would hide nothing */
#define BELOW_OPEN (-3)    /* a queued task: open the parent's below dir's entry when it starts */

/* --- the run ------------------------------------------------------------------------------ */

struct counters {
	unsigned long renamed;         /* entries moved from UPPER into TARGET */
	unsigned long deleted;         /* TARGET entries taken out (to the trash) */
	unsigned long whiteouts;       /* whiteouts applied */
	unsigned long whiteouts_kept;  /* of those, published as whiteouts: the layer below has the name */
	unsigned long stale_whiteouts; /* TARGET's own whiteouts that no longer hide anything */
	unsigned long opaque_dirs;     /* opaque upper dirs that replaced a whole TARGET entry */
	unsigned long dirs_merged;     /* upper dirs merged into an existing TARGET dir */
	unsigned long dirs_moved;      /* upper dirs moved in whole, then walked for overlay markers */
	unsigned long xattrs_removed;  /* overlay xattrs stripped, and dir xattrs the upper lacks */
	unsigned long entries;         /* upper entries looked at */
};

struct task;

struct merge {
	const char *upper_root;
	const char *target_root;
	const char *below_root; /* NULL: unknown, or nothing with flatten */
	bool flatten;
	int trash_fd;
	unsigned long trash_serial;
	int jobs;
	long crash_after; /* 0: never */
	long mutations;   /* changes made (or about to be) to either tree */

	pthread_mutex_t lock;
	pthread_cond_t wake;
	struct task **stack; /* directories waiting for a worker; LIFO keeps few dirs open at once */
	size_t stack_count;
	size_t stack_size;
	bool finished;
	bool failed;

	struct counters counts;
};

enum task_kind {
	TASK_MERGE, /* an upper dir over a TARGET dir: merge entry by entry */
	TASK_MOVED, /* a dir moved into TARGET whole: keep only the overlay markers still needed */
};

struct name_list {
	char *names; /* NUL-separated, as listxattr gives them */
	size_t length;
};

struct task {
	struct task *parent;
	char *name; /* in the parent dir; NULL for the root */
	enum task_kind kind;
	int upper_fd;  /* O_PATH; merge tasks only */
	int target_fd; /* O_PATH */
	int below_fd;  /* O_PATH, or BELOW_* */
	struct stat upper_st;  /* the upper dir as found: the metadata TARGET's dir ends up with */
	struct stat target_st; /* merge tasks: TARGET's dir as found */
	struct name_list upper_xattrs;  /* merge tasks: the upper dir's xattrs, overlay ones left out */
	struct name_list target_xattrs; /* merge tasks: TARGET's dir's xattrs as found */
	bool target_opaque;  /* merge tasks: TARGET's dir was opaque="y" */
	bool below_has_dir;  /* merge tasks: the layer below may have this dir, so opaque may matter */
	bool mode_reset;     /* merge tasks: owner or ACL written, which may change the mode bits */
	int pending;  /* unfinished children, plus one while the dir itself is being listed */
	int unopened; /* children that have not opened their dirs yet, plus one while listing */
};

/* Scratch space of one worker: xattr lists and values do not fit on a small stack. */
struct scratch {
	char list[XATTR_LIST_BYTES];
	char other_list[XATTR_LIST_BYTES];
	char value[XATTR_VALUE_BYTES];
};

static void count(unsigned long *counter)
{
	__atomic_add_fetch(counter, 1, __ATOMIC_RELAXED);
}

static bool has_failed(struct merge *m)
{
	return __atomic_load_n(&m->failed, __ATOMIC_ACQUIRE);
}

/* Every change to either tree passes here first, so a test can kill the run at any of them. */
static void before_change(struct merge *m)
{
	if (__atomic_add_fetch(&m->mutations, 1, __ATOMIC_SEQ_CST) == m->crash_after)
		raise(SIGKILL);
}

/* --- messages ----------------------------------------------------------------------------- */

/* Names may hold any byte but '/' and NUL; a message shows them one line long and unambiguous. */
static void append_escaped(char *out, size_t size, const char *text)
{
	size_t used = strlen(out);
	for (const unsigned char *p = (const unsigned char *)text; *p && used + 5 < size; p++) {
		if (*p == '\\')
			used += (size_t)snprintf(out + used, size - used, "\\\\");
		else if (*p < 0x20 || *p >= 0x7f)
			used += (size_t)snprintf(out + used, size - used, "\\x%02x", *p);
		else
			out[used++] = (char)*p;
	}
	out[used] = '\0';
}

static void append_relative(char *out, size_t size, const struct task *task)
{
	if (task == NULL || task->name == NULL)
		return;
	append_relative(out, size, task->parent);
	append_escaped(out, size, "/");
	append_escaped(out, size, task->name);
}

/* ROOT/relative path of an entry NAME (or of the task's dir when NAME is NULL). */
static void describe(char *out, size_t size, const char *root, const struct task *task, const char *name)
{
	out[0] = '\0';
	append_escaped(out, size, root);
	append_relative(out, size, task);
	if (name != NULL) {
		append_escaped(out, size, "/");
		append_escaped(out, size, name);
	}
}

static void stop_all(struct merge *m)
{
	pthread_mutex_lock(&m->lock);
	__atomic_store_n(&m->failed, true, __ATOMIC_RELEASE);
	pthread_cond_broadcast(&m->wake);
	pthread_mutex_unlock(&m->lock);
}

/* Reports "labvm_merge: WHAT ROOT/PATH: REASON" once, stops the run, returns -1. */
static int fail(struct merge *m, const char *root, const struct task *task, const char *name, const char *what, int err,
		const char *reason)
{
	char path[MESSAGE_BYTES / 2];
	char message[MESSAGE_BYTES];
	describe(path, sizeof(path), root, task, name);
	snprintf(message, sizeof(message), "labvm_merge: %s %s: %s\n", what, path, reason ? reason : strerror(err));
	/* One write: messages of several workers must not interleave. */
	ssize_t ignored = write(STDERR_FILENO, message, strlen(message));
	(void)ignored;
	stop_all(m);
	return -1;
}

static int fail_upper(struct merge *m, const struct task *task, const char *name, const char *what, int err)
{
	return fail(m, m->upper_root, task, name, what, err, NULL);
}

static int fail_target(struct merge *m, const struct task *task, const char *name, const char *what, int err)
{
	return fail(m, m->target_root, task, name, what, err, NULL);
}

/* --- xattrs ------------------------------------------------------------------------------- */

/*
 * xattr calls have no *at() form on the kernels nodes run, and the f*xattr calls refuse the
 * O_PATH descriptors this walk holds. /proc/self/fd/DIRFD/NAME reaches NAME inside DIRFD
 * without resolving any path the trees could redirect; the l* calls then leave a final
 * symlink unfollowed. With NAME NULL it is the directory DIRFD itself (the magic link is
 * followed, so the plain calls are used).
 */
struct xattr_ref {
	char path[PROC_PATH_BYTES];
	bool follow;
};

static void xattr_ref(struct xattr_ref *ref, int dirfd, const char *name)
{
	if (name != NULL)
		snprintf(ref->path, sizeof(ref->path), "/proc/self/fd/%d/%s", dirfd, name);
	else
		snprintf(ref->path, sizeof(ref->path), "/proc/self/fd/%d", dirfd);
	ref->follow = name == NULL;
}

static ssize_t ref_list(const struct xattr_ref *ref, char *list, size_t size)
{
	return ref->follow ? listxattr(ref->path, list, size) : llistxattr(ref->path, list, size);
}

static ssize_t ref_get(const struct xattr_ref *ref, const char *key, void *value, size_t size)
{
	return ref->follow ? getxattr(ref->path, key, value, size) : lgetxattr(ref->path, key, value, size);
}

static int ref_set(const struct xattr_ref *ref, const char *key, const void *value, size_t size)
{
	return ref->follow ? setxattr(ref->path, key, value, size, 0) : lsetxattr(ref->path, key, value, size, 0);
}

static int ref_remove(const struct xattr_ref *ref, const char *key)
{
	return ref->follow ? removexattr(ref->path, key) : lremovexattr(ref->path, key);
}

/* Overlay's own xattrs; an escaped one (trusted.overlay.overlay.*) belongs to the member. */
static bool is_overlay_xattr(const char *key)
{
	return strncmp(key, OVERLAY_PREFIX, strlen(OVERLAY_PREFIX)) == 0 &&
	       strncmp(key, OVERLAY_ESCAPED_PREFIX, strlen(OVERLAY_ESCAPED_PREFIX)) != 0;
}

/* Filesystems without xattr support answer ENOTSUP: that is an empty list. */
static ssize_t list_xattrs(const struct xattr_ref *ref, char *list, size_t size)
{
	ssize_t length = ref_list(ref, list, size);
	if (length < 0 && errno == ENOTSUP)
		return 0;
	return length;
}

static bool list_has(const char *list, size_t length, const char *key)
{
	for (size_t at = 0; at < length; at += strlen(list + at) + 1)
		if (strcmp(list + at, key) == 0)
			return true;
	return false;
}

/* What an entry's xattrs say about it, from one listxattr call. */
struct overlay_marks {
	bool opaque;   /* has trusted.overlay.opaque: its value decides */
	bool whiteout; /* has trusted.overlay.whiteout */
	bool refused;  /* redirect or metacopy: points into the lower layer */
	const char *refused_key;
	bool any_overlay;
};

static struct overlay_marks read_marks(const char *list, size_t length)
{
	struct overlay_marks marks = { 0 };
	for (size_t at = 0; at < length; at += strlen(list + at) + 1) {
		const char *key = list + at;
		if (!is_overlay_xattr(key))
			continue;
		marks.any_overlay = true;
		if (strcmp(key, OVERLAY_OPAQUE) == 0)
			marks.opaque = true;
		else if (strcmp(key, OVERLAY_WHITEOUT) == 0)
			marks.whiteout = true;
		else if (strcmp(key, OVERLAY_REDIRECT) == 0 || strcmp(key, OVERLAY_METACOPY) == 0) {
			marks.refused = true;
			marks.refused_key = key;
		}
	}
	return marks;
}

/* Of overlay's bookkeeping, a published layer keeps only opaque="y" where it means something
 * (KEEP_OPAQUE): the next overlay mounted over it would read anything else as its own (an
 * origin, an impure dir, a uuid). */
static int strip_overlay_xattrs(struct merge *m, const struct xattr_ref *ref, const char *list, size_t length,
				bool keep_opaque)
{
	for (size_t at = 0; at < length; at += strlen(list + at) + 1) {
		const char *key = list + at;
		if (!is_overlay_xattr(key) || (keep_opaque && strcmp(key, OVERLAY_OPAQUE) == 0))
			continue;
		before_change(m);
		if (ref_remove(ref, key) < 0 && errno != ENODATA)
			return -1;
		count(&m->counts.xattrs_removed);
	}
	return 0;
}

/* The opaque value "y" hides the lower dir; "x" only says the dir holds xattr whiteouts. */
static int read_opaque(const struct xattr_ref *ref, bool *opaque)
{
	char value[8];
	ssize_t length = ref_get(ref, OVERLAY_OPAQUE, value, sizeof(value));
	if (length < 0)
		return errno == ENODATA ? (*opaque = false, 0) : -1;
	*opaque = length == 1 && value[0] == 'y';
	return 0;
}

static struct name_list copy_names(const char *list, size_t length)
{
	struct name_list copy = { malloc(length + 1), length };
	if (copy.names == NULL) {
		perror("labvm_merge: out of memory");
		exit(EXIT_FAILURE);
	}
	memcpy(copy.names, list, length);
	return copy;
}

static struct name_list keep_user_xattrs(const char *list, size_t length)
{
	struct name_list kept = { malloc(length + 1), 0 };
	if (kept.names == NULL) {
		perror("labvm_merge: out of memory");
		exit(EXIT_FAILURE);
	}
	for (size_t at = 0; at < length; at += strlen(list + at) + 1) {
		size_t size = strlen(list + at) + 1;
		if (is_overlay_xattr(list + at))
			continue;
		memcpy(kept.names + kept.length, list + at, size);
		kept.length += size;
	}
	return kept;
}

/* Makes TARGET's dir carry exactly the upper dir's xattrs (overlay's own excluded), except
 * that it keeps an opaque="y" of its own while that hides something below.
 * *touched_acl: an ACL was written, which rewrites the mode's group bits. */
static int sync_dir_xattrs(struct merge *m, struct scratch *s, struct task *task, bool *touched_acl)
{
	struct xattr_ref upper;
	struct xattr_ref target;
	xattr_ref(&upper, task->upper_fd, NULL);
	xattr_ref(&target, task->target_fd, NULL);
	const struct name_list *wanted = &task->upper_xattrs;
	const struct name_list *found = &task->target_xattrs;
	bool keep_opaque = task->target_opaque && task->below_has_dir;
	for (size_t at = 0; at < found->length; at += strlen(found->names + at) + 1) {
		const char *key = found->names + at;
		if (!is_overlay_xattr(key) && list_has(wanted->names, wanted->length, key))
			continue;
		if (keep_opaque && strcmp(key, OVERLAY_OPAQUE) == 0)
			continue;
		before_change(m);
		if (ref_remove(&target, key) < 0 && errno != ENODATA)
			return fail_target(m, task, NULL, "cannot remove an xattr of", errno);
		count(&m->counts.xattrs_removed);
		*touched_acl |= strncmp(key, "system.posix_acl", 16) == 0;
	}
	for (size_t at = 0; at < wanted->length; at += strlen(wanted->names + at) + 1) {
		const char *key = wanted->names + at;
		ssize_t size = ref_get(&upper, key, s->value, sizeof(s->value));
		if (size < 0)
			return fail_upper(m, task, NULL, "cannot read an xattr of", errno);
		before_change(m);
		if (ref_set(&target, key, s->value, (size_t)size) < 0)
			return fail_target(m, task, NULL, "cannot set an xattr of", errno);
		*touched_acl |= strncmp(key, "system.posix_acl", 16) == 0;
	}
	return 0;
}

/* --- the stack of directories ------------------------------------------------------------- */

static void push_task(struct merge *m, struct task *task)
{
	pthread_mutex_lock(&m->lock);
	if (m->stack_count == m->stack_size) {
		m->stack_size = m->stack_size ? m->stack_size * 2 : 256;
		m->stack = realloc(m->stack, m->stack_size * sizeof(*m->stack));
		if (m->stack == NULL) {
			perror("labvm_merge: out of memory");
			exit(EXIT_FAILURE);
		}
	}
	m->stack[m->stack_count++] = task;
	pthread_cond_signal(&m->wake);
	pthread_mutex_unlock(&m->lock);
}

/* The next directory to work on, or NULL once the run has finished or failed. */
static struct task *pop_task(struct merge *m)
{
	struct task *task = NULL;
	pthread_mutex_lock(&m->lock);
	while (m->stack_count == 0 && !m->finished && !m->failed)
		pthread_cond_wait(&m->wake, &m->lock);
	if (m->stack_count > 0 && !m->failed)
		task = m->stack[--m->stack_count];
	pthread_mutex_unlock(&m->lock);
	return task;
}

static struct task *new_task(struct task *parent, const char *name, enum task_kind kind, const struct stat *upper_st,
			     int below)
{
	struct task *task = calloc(1, sizeof(*task));
	if (task == NULL || (name != NULL && (task->name = strdup(name)) == NULL)) {
		perror("labvm_merge: out of memory");
		exit(EXIT_FAILURE);
	}
	task->parent = parent;
	task->kind = kind;
	task->upper_fd = -1;
	task->target_fd = -1;
	task->below_fd = below;
	task->upper_st = *upper_st;
	task->pending = 1;
	task->unopened = 1;
	return task;
}

static void free_task(struct task *task)
{
	if (task->upper_fd >= 0)
		close(task->upper_fd);
	if (task->target_fd >= 0)
		close(task->target_fd);
	if (task->below_fd >= 0)
		close(task->below_fd);
	free(task->upper_xattrs.names);
	free(task->target_xattrs.names);
	free(task->name);
	free(task);
}

static void add_child(struct merge *m, struct task *parent, struct task *child)
{
	__atomic_add_fetch(&parent->pending, 1, __ATOMIC_ACQ_REL);
	__atomic_add_fetch(&parent->unopened, 1, __ATOMIC_ACQ_REL);
	push_task(m, child);
}

/* --- finishing a directory ---------------------------------------------------------------- */

static int set_dir_times(struct merge *m, struct task *task)
{
	char path[PROC_PATH_BYTES];
	struct timespec times[2] = { task->upper_st.st_atim, task->upper_st.st_mtim };
	snprintf(path, sizeof(path), "/proc/self/fd/%d", task->target_fd);
	before_change(m);
	if (utimensat(AT_FDCWD, path, times, 0) < 0)
		return fail_target(m, task, NULL, "cannot set the times of", errno);
	return 0;
}

/* When a merged dir's work starts: owner first (it may clear mode bits), then xattrs (an ACL
 * rewrites the mode). Neither changes as entries move in. */
static int adopt_owner_and_xattrs(struct merge *m, struct scratch *s, struct task *task)
{
	const struct stat *want = &task->upper_st;
	const struct stat *have = &task->target_st;
	bool touched_acl = false;
	if (want->st_uid != have->st_uid || want->st_gid != have->st_gid) {
		before_change(m);
		if (fchownat(task->target_fd, "", want->st_uid, want->st_gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0)
			return fail_target(m, task, NULL, "cannot change the owner of", errno);
		task->mode_reset = true;
	}
	if (sync_dir_xattrs(m, s, task, &touched_acl) < 0)
		return -1;
	task->mode_reset |= touched_acl;
	return 0;
}

/* Once its children are done: the mode, then the times, which every change before moved. */
static int finish_merged_dir(struct merge *m, struct task *task)
{
	if ((task->upper_st.st_mode & 07777) != (task->target_st.st_mode & 07777) || task->mode_reset) {
		char path[PROC_PATH_BYTES];
		snprintf(path, sizeof(path), "/proc/self/fd/%d", task->target_fd);
		before_change(m);
		if (chmod(path, task->upper_st.st_mode & 07777) < 0)
			return fail_target(m, task, NULL, "cannot change the mode of", errno);
	}
	return set_dir_times(m, task);
}

static int finish_task(struct merge *m, struct task *task)
{
	if (task->kind == TASK_MERGE)
		return finish_merged_dir(m, task);
	/* Moving a dir and changing entries in it moved its times; nothing else of it changed. */
	return set_dir_times(m, task);
}

static void finish_run(struct merge *m)
{
	pthread_mutex_lock(&m->lock);
	m->finished = true;
	pthread_cond_broadcast(&m->wake);
	pthread_mutex_unlock(&m->lock);
}

/* TASK's listing is done, or one of its children has opened its dirs: once both are true of
 * all, nothing opens a name in its UPPER or below dir any more, and it waits with one
 * descriptor (TARGET's, for its mode and times). */
static void release_opened(struct task *task)
{
	if (__atomic_sub_fetch(&task->unopened, 1, __ATOMIC_ACQ_REL) != 0)
		return;
	if (task->upper_fd >= 0)
		close(task->upper_fd);
	task->upper_fd = -1;
	if (task->below_fd >= 0) {
		close(task->below_fd);
		task->below_fd = BELOW_NONE;
	}
}

/* One unit of TASK's work is done; the last one finishes it, and maybe its parents. */
static int release_task(struct merge *m, struct task *task)
{
	while (task != NULL) {
		if (__atomic_sub_fetch(&task->pending, 1, __ATOMIC_ACQ_REL) != 0)
			return 0;
		if (has_failed(m) || finish_task(m, task) < 0)
			return -1;
		struct task *parent = task->parent;
		free_task(task);
		if (parent == NULL)
			finish_run(m);
		task = parent;
	}
	return 0;
}

/* --- entries ------------------------------------------------------------------------------ */

struct entry {
	const char *name;
	unsigned char type; /* d_type; DT_UNKNOWN when readdir could not tell */
	struct stat st;
	bool have_stat;
	struct overlay_marks marks;
	ssize_t xattr_length; /* of the scratch list */
};

enum entry_role { ROLE_WHITEOUT, ROLE_DIR, ROLE_OTHER };

static bool is_whiteout(const struct entry *e)
{
	if (S_ISCHR(e->st.st_mode) && e->st.st_rdev == makedev(0, 0))
		return true;
	return e->marks.whiteout && S_ISREG(e->st.st_mode) && e->st.st_size == 0;
}

static enum entry_role role_of(const struct entry *e)
{
	if (!e->have_stat)
		return ROLE_OTHER; /* the only types left unstatted: never a dir or whiteout */
	if (is_whiteout(e))
		return ROLE_WHITEOUT;
	return S_ISDIR(e->st.st_mode) ? ROLE_DIR : ROLE_OTHER;
}

/* Reads what the walk needs of one entry in DIRFD: its xattr names always (to strip overlay's),
 * its stat only where d_type leaves a question: a stat is a round trip on MooseFS. */
static int inspect_entry(struct merge *m, struct scratch *s, struct task *task, const char *root, int dirfd, struct entry *e)
{
	struct xattr_ref ref;
	xattr_ref(&ref, dirfd, e->name);
	count(&m->counts.entries);
	e->xattr_length = list_xattrs(&ref, s->list, sizeof(s->list));
	if (e->xattr_length < 0)
		return fail(m, root, task, e->name, "cannot list xattrs of", errno, NULL);
	e->marks = read_marks(s->list, (size_t)e->xattr_length);
	if (e->marks.refused) {
		char reason[256];
		snprintf(reason, sizeof(reason),
			 "carries %s: the upper layer was written by an overlay with redirect_dir or metacopy on; "
			 "labvm mounts with both off and cannot merge it",
			 e->marks.refused_key);
		return fail(m, root, task, e->name, "refusing", 0, reason);
	}
	bool need_stat = e->type == DT_DIR || e->type == DT_CHR || e->type == DT_UNKNOWN ||
			 (e->type == DT_REG && e->marks.whiteout);
	if (need_stat) {
		if (fstatat(dirfd, e->name, &e->st, AT_SYMLINK_NOFOLLOW) < 0)
			return fail(m, root, task, e->name, "cannot stat", errno, NULL);
		e->have_stat = true;
	}
	return 0;
}

/* --- what lies below -------------------------------------------------------------------- */

struct below {
	bool entry; /* the layer below (may) have this name: a whiteout here hides it */
	bool dir;   /* ... as a directory: an opaque marker here hides its content */
};

static int look_below(struct merge *m, struct task *task, const char *name, struct below *b)
{
	struct stat st;
	b->entry = b->dir = task->below_fd == BELOW_UNKNOWN;
	if (task->below_fd < 0)
		return 0;
	if (fstatat(task->below_fd, name, &st, AT_SYMLINK_NOFOLLOW) == 0) {
		b->entry = true;
		b->dir = S_ISDIR(st.st_mode);
		return 0;
	}
	if (errno == ENOENT || errno == ENOTDIR)
		return 0;
	return fail(m, m->below_root, task, name, "cannot stat", errno, NULL);
}

/* What lies below a child dir: only a directory below continues below it. */
static int below_child(const struct task *task, const struct below *b)
{
	if (task->below_fd == BELOW_UNKNOWN)
		return BELOW_UNKNOWN;
	return b->dir ? BELOW_OPEN : BELOW_NONE;
}

/* --- entries ------------------------------------------------------------------------------ */

/* Takes NAME out of TARGET's dir: one rename into the trash, whatever size a tree is. */
static int trash_target_entry(struct merge *m, struct task *task, const char *name)
{
	char trash_name[32];
	snprintf(trash_name, sizeof(trash_name), "%lu", __atomic_add_fetch(&m->trash_serial, 1, __ATOMIC_RELAXED));
	before_change(m);
	if (renameat(task->target_fd, name, m->trash_fd, trash_name) == 0) {
		count(&m->counts.deleted);
		return 0;
	}
	if (errno == ENOENT)
		return 0;
	if (errno == EXDEV)
		return fail(m, m->target_root, task, name, "cannot move to the trash", errno,
			    "the trash beside UPPER is on another mount (is UPPER a mount point?)");
	return fail_target(m, task, name, "cannot move to the trash", errno);
}

/* rename(2) replaces a TARGET entry of a compatible type by itself; anything else (a dir under
 * a file, a full dir under anything) goes to the trash first. */
static int move_into_target(struct merge *m, struct task *task, const char *name)
{
	for (int attempt = 0;; attempt++) {
		before_change(m);
		if (renameat(task->upper_fd, name, task->target_fd, name) == 0) {
			count(&m->counts.renamed);
			return 0;
		}
		int err = errno;
		bool in_the_way = err == EISDIR || err == ENOTDIR || err == ENOTEMPTY || err == EEXIST;
		if (!in_the_way || attempt > 0) {
			if (err == EXDEV)
				return fail(m, m->upper_root, task, name, "cannot move", err,
					    "UPPER and TARGET must be on the same mount of one filesystem");
			return fail_upper(m, task, name, "cannot move into TARGET", err);
		}
		if (trash_target_entry(m, task, name) < 0)
			return -1;
	}
}

static int strip_entry(struct merge *m, struct scratch *s, struct task *task, const char *root, int dirfd,
		       const struct entry *e, bool keep_opaque)
{
	if (!e->marks.any_overlay)
		return 0;
	struct xattr_ref ref;
	xattr_ref(&ref, dirfd, e->name);
	if (strip_overlay_xattrs(m, &ref, s->list, (size_t)e->xattr_length, keep_opaque) < 0)
		return fail(m, root, task, e->name, "cannot remove overlay xattrs of", errno, NULL);
	return 0;
}

static int make_whiteout(struct merge *m, struct task *task, const char *name)
{
	before_change(m);
	if (mknodat(task->target_fd, name, S_IFCHR | 0000, makedev(0, 0)) < 0)
		return fail_target(m, task, name, "cannot create a whiteout at", errno);
	return 0;
}

static int mark_opaque(struct merge *m, struct task *task, const char *name)
{
	struct xattr_ref ref;
	xattr_ref(&ref, task->target_fd, name);
	before_change(m);
	if (ref_set(&ref, OVERLAY_OPAQUE, "y", 1) < 0)
		return fail_target(m, task, name, "cannot mark opaque", errno);
	return 0;
}

static bool is_xattr_whiteout(const struct entry *e)
{
	return S_ISREG(e->st.st_mode);
}

/* The member deleted a name the layer below has: the whiteout itself is published, as the
 * kind every kernel understands, a 0/0 character device. */
static int publish_whiteout(struct merge *m, struct scratch *s, struct task *task, const struct entry *e)
{
	count(&m->counts.whiteouts_kept);
	if (is_xattr_whiteout(e))
		return trash_target_entry(m, task, e->name) < 0 ? -1 : make_whiteout(m, task, e->name);
	if (strip_entry(m, s, task, m->upper_root, task->upper_fd, e, false) < 0)
		return -1;
	return move_into_target(m, task, e->name);
}

/* The upper dir replaces whatever TARGET had there. KEEP_OPAQUE: it was opaque and there is
 * something below to hide; MAKE_OPAQUE: it replaced a non-dir or whiteout, which stopped
 * overlay's lookup there, and a dir below must stay hidden. */
static int move_dir_in(struct merge *m, struct scratch *s, struct task *task, const struct entry *e, bool keep_opaque,
		       bool make_opaque, int below)
{
	if (strip_entry(m, s, task, m->upper_root, task->upper_fd, e, keep_opaque) < 0 ||
	    move_into_target(m, task, e->name) < 0)
		return -1;
	if (make_opaque && mark_opaque(m, task, e->name) < 0)
		return -1;
	count(&m->counts.dirs_moved);
	add_child(m, task, new_task(task, e->name, TASK_MOVED, &e->st, below));
	return 0;
}

static int entry_is_opaque(struct merge *m, struct task *task, const char *root, int dirfd, const struct entry *e,
			   bool *opaque)
{
	struct xattr_ref ref;
	*opaque = false;
	xattr_ref(&ref, dirfd, e->name);
	if (e->marks.opaque && read_opaque(&ref, opaque) < 0)
		return fail(m, root, task, e->name, "cannot read trusted.overlay.opaque of", errno, NULL);
	return 0;
}

static int merge_dir_entry(struct merge *m, struct scratch *s, struct task *task, const struct entry *e)
{
	bool opaque;
	struct below b;
	if (entry_is_opaque(m, task, m->upper_root, task->upper_fd, e, &opaque) < 0 || look_below(m, task, e->name, &b) < 0)
		return -1;
	if (opaque) {
		count(&m->counts.opaque_dirs);
		return move_dir_in(m, s, task, e, b.dir, false, BELOW_NONE);
	}
	struct stat target_st;
	if (fstatat(task->target_fd, e->name, &target_st, AT_SYMLINK_NOFOLLOW) < 0) {
		if (errno != ENOENT)
			return fail_target(m, task, e->name, "cannot stat", errno);
		return move_dir_in(m, s, task, e, false, false, below_child(task, &b));
	}
	if (!S_ISDIR(target_st.st_mode))
		return move_dir_in(m, s, task, e, false, b.dir, BELOW_NONE);
	struct task *child = new_task(task, e->name, TASK_MERGE, &e->st, below_child(task, &b));
	child->target_st = target_st;
	child->below_has_dir = b.dir;
	child->upper_xattrs = keep_user_xattrs(s->list, (size_t)e->xattr_length);
	count(&m->counts.dirs_merged);
	add_child(m, task, child);
	return 0;
}

static int merge_entry(struct merge *m, struct scratch *s, struct task *task, struct entry *e)
{
	struct below b;
	if (inspect_entry(m, s, task, m->upper_root, task->upper_fd, e) < 0)
		return -1;
	switch (role_of(e)) {
	case ROLE_WHITEOUT:
		count(&m->counts.whiteouts);
		if (look_below(m, task, e->name, &b) < 0)
			return -1;
		return b.entry ? publish_whiteout(m, s, task, e) : trash_target_entry(m, task, e->name);
	case ROLE_DIR:
		return merge_dir_entry(m, s, task, e);
	case ROLE_OTHER:
		break;
	}
	if (strip_entry(m, s, task, m->upper_root, task->upper_fd, e, false) < 0)
		return -1;
	return move_into_target(m, task, e->name);
}

static int remove_whiteout(struct merge *m, struct task *task, const char *name)
{
	before_change(m);
	if (unlinkat(task->target_fd, name, 0) < 0)
		return fail_target(m, task, name, "cannot remove the whiteout", errno);
	return 0;
}

static int clean_whiteout(struct merge *m, struct scratch *s, struct task *task, const struct entry *e)
{
	struct below b;
	count(&m->counts.whiteouts);
	if (look_below(m, task, e->name, &b) < 0)
		return -1;
	if (!b.entry)
		return remove_whiteout(m, task, e->name);
	count(&m->counts.whiteouts_kept);
	if (is_xattr_whiteout(e))
		return remove_whiteout(m, task, e->name) < 0 ? -1 : make_whiteout(m, task, e->name);
	return strip_entry(m, s, task, m->target_root, task->target_fd, e, false);
}

/* An entry of a dir that was moved in whole. Its whiteouts and opaque markers stay only where
 * the layer below has something for them to hide; overlay's other xattrs go. */
static int clean_entry(struct merge *m, struct scratch *s, struct task *task, struct entry *e)
{
	if (inspect_entry(m, s, task, m->target_root, task->target_fd, e) < 0)
		return -1;
	switch (role_of(e)) {
	case ROLE_WHITEOUT:
		return clean_whiteout(m, s, task, e);
	case ROLE_DIR: {
		bool opaque;
		struct below b;
		if (entry_is_opaque(m, task, m->target_root, task->target_fd, e, &opaque) < 0 ||
		    look_below(m, task, e->name, &b) < 0)
			return -1;
		if (strip_entry(m, s, task, m->target_root, task->target_fd, e, opaque && b.dir) < 0)
			return -1;
		int below = opaque ? BELOW_NONE : below_child(task, &b);
		add_child(m, task, new_task(task, e->name, TASK_MOVED, &e->st, below));
		return 0;
	}
	case ROLE_OTHER:
		break;
	}
	return strip_entry(m, s, task, m->target_root, task->target_fd, e, false);
}

/* --- listing a directory ------------------------------------------------------------------ */

struct listing {
	char *names; /* NUL-separated */
	size_t length;
	size_t size;
	unsigned char *types;
	size_t count;
	size_t types_size;
};

static void listing_add(struct listing *l, const char *name, unsigned char type)
{
	size_t need = strlen(name) + 1;
	if (l->length + need > l->size) {
		l->size = (l->size + need) * 2;
		l->names = realloc(l->names, l->size);
	}
	if (l->count == l->types_size) {
		l->types_size = l->types_size ? l->types_size * 2 : 64;
		l->types = realloc(l->types, l->types_size);
	}
	if (l->names == NULL || l->types == NULL) {
		perror("labvm_merge: out of memory");
		exit(EXIT_FAILURE);
	}
	memcpy(l->names + l->length, name, need);
	l->length += need;
	l->types[l->count++] = type;
}

/* The whole listing is read before anything in the dir changes: renaming entries out of a
 * dir while reading it could skip or repeat names. */
static int read_listing(int dir_opath_fd, struct listing *l)
{
	int fd = openat(dir_opath_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	DIR *dir = fdopendir(fd);
	if (dir == NULL) {
		close(fd);
		return -1;
	}
	struct dirent *d;
	errno = 0;
	while ((d = readdir(dir)) != NULL) {
		if (strcmp(d->d_name, ".") == 0 || strcmp(d->d_name, "..") == 0)
			continue;
		listing_add(l, d->d_name, d->d_type);
		errno = 0;
	}
	int err = errno;
	closedir(dir);
	errno = err;
	return err ? -1 : 0;
}

/* TARGET's own opaque="y" on a merged dir: while it stays, nothing below the dir shows. */
static int read_target_xattrs(struct merge *m, struct scratch *s, struct task *task)
{
	struct xattr_ref ref;
	xattr_ref(&ref, task->target_fd, NULL);
	ssize_t length = list_xattrs(&ref, s->other_list, sizeof(s->other_list));
	if (length < 0)
		return fail_target(m, task, NULL, "cannot list xattrs of", errno);
	task->target_xattrs = copy_names(s->other_list, (size_t)length);
	if (list_has(s->other_list, (size_t)length, OVERLAY_OPAQUE) && read_opaque(&ref, &task->target_opaque) < 0)
		return fail_target(m, task, NULL, "cannot read trusted.overlay.opaque of", errno);
	if (task->target_opaque) {
		if (task->below_fd >= 0)
			close(task->below_fd);
		task->below_fd = BELOW_NONE;
	}
	return 0;
}

static int open_below(struct merge *m, struct task *task)
{
	if (task->below_fd != BELOW_OPEN)
		return 0;
	task->below_fd = openat(task->parent->below_fd, task->name, DIR_OPEN_FLAGS);
	if (task->below_fd >= 0)
		return 0;
	if (errno == ENOENT || errno == ENOTDIR || errno == ELOOP) {
		task->below_fd = BELOW_NONE;
		return 0;
	}
	return fail(m, m->below_root, task, NULL, "cannot open", errno, NULL);
}

static int open_own_dirs(struct merge *m, struct scratch *s, struct task *task)
{
	struct task *parent = task->parent;
	task->target_fd = openat(parent->target_fd, task->name, DIR_OPEN_FLAGS);
	if (task->target_fd < 0)
		return fail_target(m, task, NULL, "cannot open", errno);
	if (open_below(m, task) < 0)
		return -1;
	if (task->kind != TASK_MERGE)
		return 0;
	task->upper_fd = openat(parent->upper_fd, task->name, DIR_OPEN_FLAGS);
	if (task->upper_fd < 0)
		return fail_upper(m, task, NULL, "cannot open", errno);
	return read_target_xattrs(m, s, task);
}

static int open_task_dirs(struct merge *m, struct scratch *s, struct task *task)
{
	if (task->parent != NULL) {
		if (open_own_dirs(m, s, task) < 0)
			return -1;
		release_opened(task->parent);
	}
	return task->kind == TASK_MERGE ? adopt_owner_and_xattrs(m, s, task) : 0;
}

static bool is_whiteout_at(int dirfd, const char *name, unsigned char type)
{
	struct stat st;
	if (type != DT_CHR && type != DT_UNKNOWN)
		return false;
	return fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISCHR(st.st_mode) && st.st_rdev == makedev(0, 0);
}

/* TARGET's dir had a whiteout of its own, hidden while UPPER's dir merged with it. With nothing
 * below the dir now, the kernel would list it as a name that cannot be opened. */
static int drop_stale_whiteouts(struct merge *m, struct task *task)
{
	struct listing l = { 0 };
	int result = 0;
	if (read_listing(task->target_fd, &l) < 0)
		result = fail_target(m, task, NULL, "cannot read the directory", errno);
	const char *name = l.names;
	for (size_t i = 0; i < l.count && result == 0; i++, name += strlen(name) + 1) {
		if (!is_whiteout_at(task->target_fd, name, l.types[i]))
			continue;
		count(&m->counts.stale_whiteouts);
		before_change(m);
		if (unlinkat(task->target_fd, name, 0) < 0)
			result = fail_target(m, task, name, "cannot remove the whiteout", errno);
	}
	free(l.names);
	free(l.types);
	return result;
}

static int run_task(struct merge *m, struct scratch *s, struct task *task)
{
	if (open_task_dirs(m, s, task) < 0)
		return -1;
	if (task->kind == TASK_MERGE && task->below_fd == BELOW_NONE && drop_stale_whiteouts(m, task) < 0)
		return -1;
	bool merging = task->kind == TASK_MERGE;
	struct listing l = { 0 };
	int listed_fd = merging ? task->upper_fd : task->target_fd;
	if (read_listing(listed_fd, &l) < 0) {
		int err = errno;
		free(l.names);
		free(l.types);
		return fail(m, merging ? m->upper_root : m->target_root, task, NULL, "cannot read the directory", err, NULL);
	}
	int result = 0;
	const char *name = l.names;
	for (size_t i = 0; i < l.count && result == 0 && !has_failed(m); i++, name += strlen(name) + 1) {
		struct entry e = { .name = name, .type = l.types[i] };
		result = merging ? merge_entry(m, s, task, &e) : clean_entry(m, s, task, &e);
	}
	free(l.names);
	free(l.types);
	if (result < 0 || has_failed(m))
		return -1;
	release_opened(task);
	return release_task(m, task);
}

static void *worker(void *arg)
{
	struct merge *m = arg;
	struct scratch *s = malloc(sizeof(*s));
	if (s == NULL) {
		perror("labvm_merge: out of memory");
		exit(EXIT_FAILURE);
	}
	struct task *task;
	while ((task = pop_task(m)) != NULL)
		if (run_task(m, s, task) < 0)
			stop_all(m);
	free(s);
	return NULL;
}

/* --- setup -------------------------------------------------------------------------------- */

static void usage(FILE *stream)
{
	fprintf(stream,
		"usage: labvm_merge apply [--jobs N] [--stats] [--below DIR | --flatten] UPPER TARGET\n"
		"\n"
		"Applies the overlay upper layer UPPER onto TARGET (a copy of its lower layer) in place,\n"
		"moving entries with rename(2). UPPER is used up, and what TARGET loses goes to\n"
		"UPPER.trash, which the apply creates beside UPPER: delete both afterwards.\n"
		"TARGET stays a layer: whiteouts and opaque directories stay where they hide something\n"
		"in the layer below it.\n"
		"  --jobs N     directories worked on at once (1-%d, default %d)\n"
		"  --stats      print one JSON line of counts on stdout\n"
		"  --below DIR  the layer TARGET will be mounted over; without it every whiteout and\n"
		"               opaque marker is kept\n"
		"  --flatten    no layer will lie below: TARGET becomes the merged tree as plain files\n",
		MAX_JOBS, DEFAULT_JOBS);
}

struct options {
	int jobs;
	bool stats;
	bool flatten;
	const char *below;
	const char *upper;
	const char *target;
};

static bool parse_jobs(const char *text, int *jobs)
{
	char *end;
	errno = 0;
	long value = strtol(text, &end, 10);
	if (errno || end == text || *end != '\0' || value < 1 || value > MAX_JOBS)
		return false;
	*jobs = (int)value;
	return true;
}

/* Returns -1 on a usage error (already reported), 1 when help was printed, 0 to go on. */
static int parse_args(int argc, char **argv, struct options *o)
{
	const char *positional[2];
	int found = 0;
	bool options_done = false;
	o->jobs = DEFAULT_JOBS;
	o->stats = false;
	o->flatten = false;
	o->below = NULL;
	if (argc >= 2 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0)) {
		usage(stdout);
		return 1;
	}
	if (argc < 2 || strcmp(argv[1], "apply") != 0) {
		usage(stderr);
		return -1;
	}
	for (int i = 2; i < argc; i++) {
		const char *arg = argv[i];
		if (!options_done && strcmp(arg, "--") == 0) {
			options_done = true;
		} else if (!options_done && strcmp(arg, "--stats") == 0) {
			o->stats = true;
		} else if (!options_done && strcmp(arg, "--flatten") == 0) {
			o->flatten = true;
		} else if (!options_done && strcmp(arg, "--below") == 0) {
			if (i + 1 >= argc) {
				fprintf(stderr, "labvm_merge: --below needs a directory\n");
				return -1;
			}
			o->below = argv[++i];
		} else if (!options_done && strcmp(arg, "--jobs") == 0) {
			if (i + 1 >= argc || !parse_jobs(argv[++i], &o->jobs)) {
				fprintf(stderr, "labvm_merge: --jobs needs a number from 1 to %d\n", MAX_JOBS);
				return -1;
			}
		} else if (!options_done && strncmp(arg, "--jobs=", 7) == 0) {
			if (!parse_jobs(arg + 7, &o->jobs)) {
				fprintf(stderr, "labvm_merge: --jobs needs a number from 1 to %d\n", MAX_JOBS);
				return -1;
			}
		} else if (!options_done && arg[0] == '-' && arg[1] != '\0') {
			fprintf(stderr, "labvm_merge: unknown option %s\n", arg);
			usage(stderr);
			return -1;
		} else if (found < 2) {
			positional[found++] = arg;
		} else {
			fprintf(stderr, "labvm_merge: too many arguments\n");
			usage(stderr);
			return -1;
		}
	}
	if (found != 2) {
		usage(stderr);
		return -1;
	}
	if (o->flatten && o->below != NULL) {
		fprintf(stderr, "labvm_merge: --flatten says nothing lies below; it cannot go with --below\n");
		return -1;
	}
	o->upper = positional[0];
	o->target = positional[1];
	return 0;
}

static int open_root(const char *path, const char *role, struct stat *st)
{
	int fd = open(path, DIR_OPEN_FLAGS);
	if (fd < 0) {
		char shown[MESSAGE_BYTES / 2] = "";
		append_escaped(shown, sizeof(shown), path);
		fprintf(stderr, "labvm_merge: cannot open %s %s: %s\n", role, shown,
			errno == ENOTDIR || errno == ELOOP ? "not a directory" : strerror(errno));
		return -1;
	}
	if (fstat(fd, st) < 0) {
		perror("labvm_merge: fstat");
		close(fd);
		return -1;
	}
	return fd;
}

/* UPPER's path as the dir that holds it (PARENT, with its trailing slash) and the trash's name
 * there (NAME: UPPER's own name + TRASH_SUFFIX). */
static int trash_place(const char *upper, char *parent, char *name)
{
	size_t end = strlen(upper);
	while (end > 1 && upper[end - 1] == '/')
		end--;
	size_t start = end;
	while (start > 0 && upper[start - 1] != '/')
		start--;
	size_t length = end - start;
	bool dots = (length == 1 && upper[start] == '.') || (length == 2 && strncmp(upper + start, "..", 2) == 0);
	if (length == 0 || dots || length + strlen(TRASH_SUFFIX) > NAME_MAX || start >= PATH_MAX) {
		fprintf(stderr, "labvm_merge: UPPER must be a path that ends in the directory's name: its trash is "
				"made beside it, as NAME%s\n", TRASH_SUFFIX);
		return -1;
	}
	if (start == 0)
		strcpy(parent, ".");
	else {
		memcpy(parent, upper, start);
		parent[start] = '\0';
	}
	memcpy(name, upper + start, length);
	strcpy(name + length, TRASH_SUFFIX);
	return 0;
}

static int trash_failure(const char *name, const char *what, const char *reason)
{
	char shown[MESSAGE_BYTES / 2] = "";
	append_escaped(shown, sizeof(shown), name);
	fprintf(stderr, "labvm_merge: %s %s beside UPPER: %s\n", what, shown, reason);
	return -1;
}

/* The trash is created here, exclusively, outside both trees: it is the engine's own whatever
 * names the member's tree holds. One already there means UPPER was used by an earlier apply:
 * it is partly consumed, and applying what is left would publish a tree with files missing. */
static int make_trash(struct merge *m, const struct stat *upper_st)
{
	char parent[PATH_MAX];
	char name[NAME_MAX + 1];
	if (trash_place(m->upper_root, parent, name) < 0)
		return -1;
	int parent_fd = open(parent, O_PATH | O_DIRECTORY | O_CLOEXEC);
	if (parent_fd < 0)
		return trash_failure(parent, "cannot open the directory", strerror(errno));
	before_change(m);
	int made = mkdirat(parent_fd, name, 0700);
	if (made == 0)
		m->trash_fd = openat(parent_fd, name, DIR_OPEN_FLAGS);
	int err = errno;
	close(parent_fd);
	if (made < 0 && err == EEXIST)
		return trash_failure(name, "found", "an earlier apply used UPPER up partly; start again from a fresh "
						    "copy of the upper layer, without the old trash");
	if (made < 0)
		return trash_failure(name, "cannot create", strerror(err));
	struct stat st;
	if (m->trash_fd < 0 || fstat(m->trash_fd, &st) < 0)
		return trash_failure(name, "cannot open", strerror(m->trash_fd < 0 ? err : errno));
	if (st.st_dev != upper_st->st_dev)
		return trash_failure(name, "found", "it is on another filesystem than UPPER (is UPPER a mount point?)");
	return 0;
}

/* A directory waiting for its children holds one descriptor, three while one of them has not
 * started, so a deep tree needs at least one per level: as root, raise even the hard limit,
 * up to fs.nr_open. */
static void raise_fd_limit(void)
{
	struct rlimit limit;
	if (getrlimit(RLIMIT_NOFILE, &limit) != 0)
		return;
	FILE *stream = fopen("/proc/sys/fs/nr_open", "re");
	unsigned long most = 0;
	if (stream != NULL) {
		if (fscanf(stream, "%lu", &most) != 1)
			most = 0;
		fclose(stream);
	}
	struct rlimit raised = { (rlim_t)most, (rlim_t)most };
	if (most > limit.rlim_max && setrlimit(RLIMIT_NOFILE, &raised) == 0)
		return;
	if (limit.rlim_cur < limit.rlim_max) {
		limit.rlim_cur = limit.rlim_max;
		setrlimit(RLIMIT_NOFILE, &limit);
	}
}

static long crash_point_from_env(void)
{
	const char *text = getenv("LABVM_MERGE_CRASH_AFTER");
	if (text == NULL || *text == '\0')
		return 0;
	char *end;
	long value = strtol(text, &end, 10);
	return *end == '\0' && value > 0 ? value : 0;
}

static struct task *root_task(struct merge *m, int upper_fd, int target_fd, int below, const struct stat *upper_st,
			      const struct stat *target_st, struct scratch *s)
{
	struct xattr_ref ref;
	xattr_ref(&ref, upper_fd, NULL);
	ssize_t length = list_xattrs(&ref, s->list, sizeof(s->list));
	if (length < 0) {
		fail_upper(m, NULL, NULL, "cannot list xattrs of", errno);
		return NULL;
	}
	struct overlay_marks marks = read_marks(s->list, (size_t)length);
	if (marks.refused) {
		fail(m, m->upper_root, NULL, NULL, "refusing", 0, "the upper root carries a redirect or metacopy xattr");
		return NULL;
	}
	struct task *root = new_task(NULL, NULL, TASK_MERGE, upper_st, below);
	root->upper_fd = upper_fd;
	root->target_fd = target_fd;
	root->target_st = *target_st;
	root->below_has_dir = below != BELOW_NONE;
	root->upper_xattrs = keep_user_xattrs(s->list, (size_t)length);
	if (read_target_xattrs(m, s, root) < 0) {
		free_task(root);
		return NULL;
	}
	return root;
}

static void print_stats(const struct merge *m, double seconds)
{
	const struct counters *c = &m->counts;
	const char *below = m->flatten ? "none" : m->below_root ? "given" : "unknown";
	printf("{\"renamed\":%lu,\"deleted\":%lu,\"whiteouts\":%lu,\"whiteouts_kept\":%lu,\"stale_whiteouts\":%lu,"
	       "\"opaque_dirs\":%lu,\"dirs_merged\":%lu,\"dirs_moved\":%lu,\"xattrs_removed\":%lu,\"entries\":%lu,"
	       "\"changes\":%ld,\"jobs\":%d,\"below\":\"%s\",\"seconds\":%.3f,\"errors\":%d}\n",
	       c->renamed, c->deleted, c->whiteouts, c->whiteouts_kept, c->stale_whiteouts, c->opaque_dirs, c->dirs_merged,
	       c->dirs_moved, c->xattrs_removed, c->entries, m->mutations, m->jobs, below, seconds, m->failed ? 1 : 0);
	fflush(stdout);
}

static double now_seconds(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int run_workers(struct merge *m)
{
	pthread_t threads[MAX_JOBS];
	int started = 0;
	for (; started < m->jobs; started++) {
		int err = pthread_create(&threads[started], NULL, worker, m);
		if (err != 0) {
			fprintf(stderr, "labvm_merge: cannot start a worker: %s\n", strerror(err));
			stop_all(m);
			break;
		}
	}
	for (int i = 0; i < started; i++)
		pthread_join(threads[i], NULL);
	return m->failed ? -1 : 0;
}

static int apply(const struct options *o)
{
	struct merge m = {
		.upper_root = o->upper,
		.target_root = o->target,
		.below_root = o->below,
		.flatten = o->flatten,
		.trash_fd = -1,
		.jobs = o->jobs,
		.crash_after = crash_point_from_env(),
		.lock = PTHREAD_MUTEX_INITIALIZER,
		.wake = PTHREAD_COND_INITIALIZER,
	};
	double started = now_seconds();
	struct stat upper_st, target_st;
	int upper_fd = open_root(o->upper, "UPPER", &upper_st);
	int target_fd = upper_fd < 0 ? -1 : open_root(o->target, "TARGET", &target_st);
	if (upper_fd < 0 || target_fd < 0)
		return EXIT_FAILURE;
	if (upper_st.st_dev != target_st.st_dev) {
		fprintf(stderr, "labvm_merge: UPPER and TARGET are on different filesystems; entries can only be renamed within one\n");
		return EXIT_FAILURE;
	}
	if (upper_st.st_ino == target_st.st_ino) {
		fprintf(stderr, "labvm_merge: UPPER and TARGET are the same directory\n");
		return EXIT_FAILURE;
	}
	int below = o->flatten ? BELOW_NONE : BELOW_UNKNOWN;
	if (o->below != NULL) {
		struct stat below_st;
		below = open_root(o->below, "the layer below", &below_st);
		if (below < 0)
			return EXIT_FAILURE;
	}
	raise_fd_limit();
	struct scratch *s = malloc(sizeof(*s));
	if (s == NULL) {
		perror("labvm_merge: out of memory");
		return EXIT_FAILURE;
	}
	struct task *root = root_task(&m, upper_fd, target_fd, below, &upper_st, &target_st, s);
	free(s);
	if (root == NULL || make_trash(&m, &upper_st) < 0)
		return EXIT_FAILURE;
	push_task(&m, root);
	int result = run_workers(&m);
	if (o->stats)
		print_stats(&m, now_seconds() - started);
	close(m.trash_fd);
	free(m.stack);
	return result < 0 ? EXIT_FAILURE : EXIT_SUCCESS;
}

int main(int argc, char **argv)
{
	struct options o;
	int parsed = parse_args(argc, argv, &o);
	if (parsed < 0)
		return EXIT_USAGE;
	if (parsed > 0)
		return EXIT_SUCCESS;
	return apply(&o);
}
