package packaging

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jsimonetti/rtnetlink"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/tailderp/tailderp/internal/testutil"
)

// The empty root: the image's files in a fresh directory, entered in a
// network namespace of its own, as the image's uid with no capabilities.
// This is what `docker compose up` with docker-compose.yml gives the
// binary, reproduced without a container engine:
//
//	image                          here
//	scratch + build script output  a copy of imageDir, chroot(2)
//	/proc mounted by the runtime   /proc mounted, in a mount namespace of its own
//	entrypoint is PID 1            a PID namespace of its own
//	USER 65532:65532               setresuid/setresgid, no supplementary groups
//	WORKDIR /var/lib/tailderp      chdir
//	cap_drop: [ALL]                empty bounding, permitted, effective, ambient sets
//	no-new-privileges:true         PR_SET_NO_NEW_PRIVS
//	own network namespace          unshare(CLONE_NEWNET): loopback only
//	sysctls: ip_unprivileged_port_start=0   the same sysctl, in that namespace
//	read_only: true                the root is root's; only the state dir is the uid's
//	env_file: .env                 exactly the .env's variables, nothing else
//	HEALTHCHECK CMD [...]          the same argv, same uid, env and namespace
//
// Nothing can leave the machine: the namespace has no interface but lo.

// launcherArg makes the test binary the launcher (see TestMain).
const launcherArg = "packaging-launch-in-empty-root"

// launcherMain runs in a fresh copy of the test binary started by
// emptyRoot.command: it enters the network namespace passed as fd 3,
// chroots into root, drops every privilege and execs argv there with the
// environment it was given. It never returns.
//
//	<test binary> packaging-launch-in-empty-root ROOT WORKDIR UID GID -- ARGV...
func launcherMain(args []string) {
	// Namespace, capabilities and credentials below are changed for this
	// thread only; it is the one that execs, and the new program inherits
	// exactly its state.
	runtime.LockOSThread()
	fail := func(step string, err error) {
		fmt.Fprintf(os.Stderr, "packaging launcher: %s: %v\n", step, err)
		os.Exit(126)
	}
	if len(args) < 6 || args[4] != "--" {
		fail("usage", fmt.Errorf("%q", args))
	}
	root, workdir := args[0], args[1]
	uid, err1 := strconv.Atoi(args[2])
	gid, err2 := strconv.Atoi(args[3])
	if err := errors.Join(err1, err2); err != nil {
		fail("uid/gid", err)
	}
	argv := args[5:]

	if err := unix.Setns(3, unix.CLONE_NEWNET); err != nil {
		fail("setns", err)
	}
	unix.Close(3)
	// A container runtime mounts /proc (and more) into every container;
	// the Go runtime and tsnet need /proc/self/exe. This process has a
	// mount namespace of its own (emptyRoot.command), so the mount is
	// gone with it.
	if err := syscall.Mount("proc", filepath.Join(root, "proc"), "proc", syscall.MS_NOSUID|syscall.MS_NODEV|syscall.MS_NOEXEC, ""); err != nil {
		fail("mount /proc", err)
	}
	if err := syscall.Chroot(root); err != nil {
		fail("chroot", err)
	}
	if err := syscall.Chdir(workdir); err != nil { // WORKDIR
		fail("chdir", err)
	}
	// cap_drop: [ALL]: empty the bounding set (needs CAP_SETPCAP, so
	// before the uid changes); the uid change then clears the permitted,
	// effective and ambient sets.
	for c := 0; ; c++ {
		if err := unix.Prctl(unix.PR_CAPBSET_DROP, uintptr(c), 0, 0, 0); err != nil {
			if err == unix.EINVAL {
				break // past the last capability
			}
			fail("PR_CAPBSET_DROP", err)
		}
	}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		fail("PR_SET_NO_NEW_PRIVS", err)
	}
	// Raw system calls: Go's syscall.Setuid would change every thread,
	// and this thread is the only one that matters.
	if _, _, e := syscall.RawSyscall(unix.SYS_SETGROUPS, 0, 0, 0); e != 0 {
		fail("setgroups", e)
	}
	if _, _, e := syscall.RawSyscall(unix.SYS_SETRESGID, uintptr(gid), uintptr(gid), uintptr(gid)); e != 0 {
		fail("setresgid", e)
	}
	if _, _, e := syscall.RawSyscall(unix.SYS_SETRESUID, uintptr(uid), uintptr(uid), uintptr(uid)); e != 0 {
		fail("setresuid", e)
	}
	fail("exec "+argv[0], syscall.Exec(argv[0], argv, os.Environ()))
}

// requireRoot skips a test that needs root, saying why.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: it makes a network namespace and chroots into the image's files as the image's uid (CI runs as root)")
	}
}

// netns is a network namespace shaped like a container's: loopback, an
// eth0 with an address and a default route, and
// net.ipv4.ip_unprivileged_port_start=0. eth0 is one end of a veth pair
// whose other end is in the same namespace: a closed loop, so nothing
// sent "out" leaves the namespace. (Without a default route the tailnet
// node thinks the network is down and never talks to control.)
// Sockets the test itself needs in it (the control server's listener,
// probes) are made on a thread that stays in the namespace.
type netns struct {
	f   *os.File // the namespace, passed to the launcher
	ops chan func()
}

func newNetns(t *testing.T) *netns {
	t.Helper()
	requireRoot(t)
	hostPorts, err := os.ReadFile("/proc/sys/net/ipv4/ip_unprivileged_port_start")
	if err != nil {
		t.Fatal(err)
	}
	n := &netns{ops: make(chan func())}
	ready := make(chan error, 1)
	go func() {
		// Never unlocked: this thread moves to the new namespace, and when
		// this goroutine returns the runtime ends the thread instead of
		// reusing it.
		runtime.LockOSThread()
		if err := n.setup(); err != nil {
			ready <- err
			return
		}
		ready <- nil
		for op := range n.ops {
			op()
		}
	}()
	if err := <-ready; err != nil {
		t.Fatalf("network namespace: %v", err)
	}
	t.Cleanup(func() {
		close(n.ops)
		n.f.Close()
	})
	// The sysctl was set in the new namespace, not on this host.
	if now, _ := os.ReadFile("/proc/sys/net/ipv4/ip_unprivileged_port_start"); string(now) != string(hostPorts) {
		t.Fatalf("host's ip_unprivileged_port_start changed from %q to %q", hostPorts, now)
	}
	return n
}

// setup runs on the locked thread.
func (n *netns) setup() error {
	const self = "/proc/thread-self/ns/net"
	var before, after unix.Stat_t
	if err := unix.Stat(self, &before); err != nil {
		return err
	}
	if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
		return fmt.Errorf("unshare(CLONE_NEWNET): %w", err)
	}
	if err := unix.Stat(self, &after); err != nil {
		return err
	}
	if before.Ino == after.Ino {
		return errors.New("still in the host's network namespace after unshare")
	}
	f, err := os.Open(self)
	if err != nil {
		return err
	}
	n.f = f
	if err := testutil.LoopbackUp(); err != nil {
		return err
	}
	if err := addEth0(); err != nil {
		return fmt.Errorf("eth0: %w", err)
	}
	// What Docker 20.10+ sets in every container with its own network
	// namespace, and docker-compose.yml sets explicitly. /proc/sys/net is
	// the opening thread's namespace's.
	if err := os.WriteFile("/proc/sys/net/ipv4/ip_unprivileged_port_start", []byte("0\n"), 0); err != nil {
		return fmt.Errorf("sysctl net.ipv4.ip_unprivileged_port_start=0: %w", err)
	}
	return nil
}

// do runs f on a thread in the namespace. Sockets f makes stay there.
// f must not start goroutines that make sockets.
func (n *netns) do(f func()) {
	done := make(chan struct{})
	n.ops <- func() {
		defer close(done)
		f()
	}
	<-done
}

// listen makes a listener in the namespace.
func (n *netns) listen(t *testing.T, network, addr string) net.Listener {
	t.Helper()
	var ln net.Listener
	var err error
	n.do(func() { ln, err = net.Listen(network, addr) })
	if err != nil {
		t.Fatal(err)
	}
	return ln
}

// dial reports whether something accepts TCP connections on addr in the
// namespace.
func (n *netns) dialTCP(addr string) error {
	var err error
	n.do(func() {
		var c net.Conn
		c, err = net.DialTimeout("tcp", addr, 2*time.Second)
		if err == nil {
			c.Close()
		}
	})
	return err
}

// emptyRoot is a copy of the image's files, with its state directory
// owned by the image's uid as a fresh named volume would be.
type emptyRoot struct {
	dir      string
	workdir  string // the image's WORKDIR
	uid, gid int
	ns       *netns
}

func newEmptyRoot(t *testing.T, ns *netns) *emptyRoot {
	t.Helper()
	img := parseImage(t)
	r := &emptyRoot{dir: t.TempDir(), workdir: img.workdir, uid: img.uid, gid: img.gid, ns: ns}
	err := filepath.WalkDir(imageDir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(imageDir, path)
		dst := filepath.Join(r.dir, rel)
		fi, err := d.Info()
		if err != nil {
			return err
		}
		if d.IsDir() {
			if err := os.MkdirAll(dst, 0o755); err != nil {
				return err
			}
			return os.Chmod(dst, fi.Mode().Perm())
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		return os.WriteFile(dst, b, fi.Mode().Perm())
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(r.dir, 0o755); err != nil {
		t.Fatal(err)
	}
	// The mount point a container runtime creates for /proc.
	if err := os.Mkdir(filepath.Join(r.dir, "proc"), 0o555); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(r.stateDir(), r.uid, r.gid); err != nil {
		t.Fatal(err)
	}
	return r
}

// stateDir is the state volume, seen from the host.
func (r *emptyRoot) stateDir() string { return filepath.Join(r.dir, "var", "lib", "tailderp") }

// command returns argv to run in the root with exactly env.
func (r *emptyRoot) command(ctx context.Context, env []string, argv ...string) *exec.Cmd {
	self, err := os.Executable()
	if err != nil {
		panic(err)
	}
	args := append([]string{launcherArg, r.dir, r.workdir, strconv.Itoa(r.uid), strconv.Itoa(r.gid), "--"}, argv...)
	cmd := exec.CommandContext(ctx, self, args...)
	cmd.Env = append([]string{}, env...) // never nil: nil would mean "inherit"
	cmd.ExtraFiles = []*os.File{r.ns.f}
	// Own mount namespace (for /proc, private: nothing reaches the host)
	// and own PID namespace, where the program is PID 1 as in a container.
	cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS, Cloneflags: syscall.CLONE_NEWPID}
	return cmd
}

// run runs argv to completion (bounded) and returns its exit code and
// output.
func (r *emptyRoot) run(t *testing.T, env []string, argv ...string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := r.command(ctx, env, argv...)
	out, err := cmd.CombinedOutput()
	if _, ok := err.(*exec.ExitError); err != nil && !ok {
		t.Fatal(err)
	}
	if code := cmd.ProcessState.ExitCode(); code == 126 && strings.Contains(string(out), "packaging launcher:") {
		t.Fatalf("launcher failed: %s", out)
	}
	return cmd.ProcessState.ExitCode(), string(out)
}

// start starts argv in the root with exactly env; it is stopped as
// `docker stop` stops a container (stopGrace) when the test ends.
func (r *emptyRoot) start(t *testing.T, env []string, argv ...string) *testutil.Process {
	t.Helper()
	return testutil.StartProcess(t, r.command(context.Background(), env, argv...), testutil.ProcessOptions{Name: argv[0], StopGrace: stopGrace})
}

// stopGrace is how long a process in the root gets to exit after
// SIGTERM, as `docker stop` gives it, before it is killed.
const stopGrace = 15 * time.Second

// procStatus returns the fields of /proc/PID/status of p.
func procStatus(t *testing.T, p *testutil.Process) map[string]string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.Cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if ok {
			m[k] = strings.Join(strings.Fields(v), " ")
		}
	}
	return m
}

// checkUnprivileged asserts that the process runs as the image's user
// with no capability at all, as under cap_drop: [ALL] and
// no-new-privileges.
func (r *emptyRoot) checkUnprivileged(t *testing.T, p *testutil.Process) {
	t.Helper()
	st := procStatus(t, p)
	want := map[string]string{
		"Uid":        fmt.Sprintf("%d %d %d %d", r.uid, r.uid, r.uid, r.uid),
		"Gid":        fmt.Sprintf("%d %d %d %d", r.gid, r.gid, r.gid, r.gid),
		"Groups":     "",
		"CapInh":     "0000000000000000",
		"CapPrm":     "0000000000000000",
		"CapEff":     "0000000000000000",
		"CapBnd":     "0000000000000000",
		"CapAmb":     "0000000000000000",
		"NoNewPrivs": "1",
	}
	for k, v := range want {
		if st[k] != v {
			t.Errorf("/proc/%d/status %s: %q, want %q", p.Cmd.Process.Pid, k, st[k], v)
		}
	}
}

// awaitHealthy runs the healthcheck until it passes, as Docker does
// during the start period.
func (r *emptyRoot) awaitHealthy(t *testing.T, p *testutil.Process, env, healthcheck []string, d time.Duration) string {
	t.Helper()
	var code int
	var out string
	healthy := func() bool {
		code, out = r.run(t, env, healthcheck...)
		return code == 0
	}
	if !testutil.Poll(d, 200*time.Millisecond, p.Done(), healthy) {
		if p.Exited() {
			t.Fatalf("server exited (%v); last healthcheck (exit %d):\n%s", p.Err(), code, out)
		}
		t.Fatalf("healthcheck %q still failing after %v (exit %d):\n%s", healthcheck, d, code, out)
	}
	return out
}

// walkOwners returns every path in dir (relative, "/"-rooted) with its
// owner uid.
func walkOwners(t *testing.T, dir string) map[string]int {
	t.Helper()
	out := map[string]int{}
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, path)
		out["/"+rel] = int(fi.Sys().(*syscall.Stat_t).Uid)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// eth0 is the namespace's stand-in for a container's interface.
var (
	eth0Addr = net.IPv4(192, 0, 2, 2) // TEST-NET-1 (RFC 5737): never routed
	eth0GW   = net.IPv4(192, 0, 2, 1)
)

// addEth0 makes a veth pair eth0/eth1 in the current thread's namespace,
// gives eth0 192.0.2.2/24 and a default route via 192.0.2.1, and brings
// both up. No one answers at 192.0.2.1: packets for anywhere but
// loopback go nowhere.
func addEth0() error {
	conn, err := rtnetlink.Dial(nil)
	if err != nil {
		return err
	}
	defer conn.Close()
	// IFLA_INFO_DATA of a veth: VETH_INFO_PEER, an ifinfomsg followed by
	// the peer's attributes.
	peer := netlink.NewAttributeEncoder()
	peer.String(unix.IFLA_IFNAME, "eth1")
	peerAttrs, err := peer.Encode()
	if err != nil {
		return err
	}
	data := netlink.NewAttributeEncoder()
	const vethInfoPeer = 1
	data.Bytes(vethInfoPeer, append(make([]byte, unix.SizeofIfInfomsg), peerAttrs...))
	veth, err := data.Encode()
	if err != nil {
		return err
	}
	if err := conn.Link.New(&rtnetlink.LinkMessage{
		Family:     unix.AF_UNSPEC,
		Attributes: &rtnetlink.LinkAttributes{Name: "eth0", Info: &rtnetlink.LinkInfo{Kind: "veth", Data: veth}},
	}); err != nil {
		return fmt.Errorf("new veth: %w", err)
	}
	var eth0 uint32
	for _, name := range []string{"eth1", "eth0"} {
		ifi, err := net.InterfaceByName(name)
		if err != nil {
			return err
		}
		if err := conn.Link.Set(&rtnetlink.LinkMessage{Family: unix.AF_UNSPEC, Index: uint32(ifi.Index), Flags: unix.IFF_UP, Change: unix.IFF_UP}); err != nil {
			return fmt.Errorf("%s up: %w", name, err)
		}
		eth0 = uint32(ifi.Index)
	}
	if err := conn.Address.New(&rtnetlink.AddressMessage{
		Family:       unix.AF_INET,
		PrefixLength: 24,
		Index:        eth0,
		Attributes:   &rtnetlink.AddressAttributes{Address: eth0Addr, Local: eth0Addr},
	}); err != nil {
		return fmt.Errorf("address: %w", err)
	}
	if err := conn.Route.Add(&rtnetlink.RouteMessage{
		Family:     unix.AF_INET,
		Table:      unix.RT_TABLE_MAIN,
		Protocol:   unix.RTPROT_BOOT,
		Scope:      unix.RT_SCOPE_UNIVERSE,
		Type:       unix.RTN_UNICAST,
		Attributes: rtnetlink.RouteAttributes{Gateway: eth0GW, OutIface: eth0},
	}); err != nil {
		return fmt.Errorf("default route: %w", err)
	}
	return nil
}
