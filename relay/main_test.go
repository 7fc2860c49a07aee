package relay

import (
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
)

// TestToolDir is a directory for tools the tests build (upstream derper:
// DerperBinary), removed when the tests end. It lives in a _test.go file:
// the package itself has no such thing.
var TestToolDir string

// derperBuild is upstream derper (go.mod's tool dependency, the version
// tailderp builds on), built once per test process into TestToolDir:
// started by TestMain for a whole run, or by the first test that needs it.
var derperBuild struct {
	once sync.Once
	done chan struct{} // closed when the build ended
	path string
	err  error
}

// startDerperBuild starts building derper in the background, once.
func startDerperBuild() {
	derperBuild.once.Do(func() {
		derperBuild.done = make(chan struct{})
		go func() {
			defer close(derperBuild.done)
			path := filepath.Join(TestToolDir, "derper")
			out, err := exec.Command("go", "build", "-o", path, "tailscale.com/cmd/derper").CombinedOutput()
			if err != nil {
				derperBuild.err = fmt.Errorf("go build tailscale.com/cmd/derper: %v\n%s", err, out)
			}
			derperBuild.path = path
		}()
	})
}

// waitDerperBuild waits for the build, if one was started.
func waitDerperBuild() {
	if derperBuild.done != nil {
		<-derperBuild.done
	}
}

// DerperBinary returns the path of upstream derper, built for the tests
// (see mesh_fleet_test.go).
func DerperBinary(t testing.TB) string {
	t.Helper()
	startDerperBuild()
	waitDerperBuild()
	if derperBuild.err != nil {
		t.Fatal(derperBuild.err)
	}
	return derperBuild.path
}

// TestMain registers the admission scheme once, as a program does at
// start (see RegisterAdmissionScheme), before any test starts a relay with
// an Admitter.
func TestMain(m *testing.M) {
	flag.Parse()
	if err := RegisterAdmissionScheme(http.DefaultTransport); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	dir, err := os.MkdirTemp("", "tailderp-relay-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	TestToolDir = dir
	// A whole run needs upstream derper (TestMeshFleet): build it while
	// the sequential tests run, not when the fleet test starts. A run of
	// chosen tests (-run) builds it only if one asks for it.
	if f := flag.Lookup("test.run"); f != nil && f.Value.String() == "" && !testing.Short() {
		startDerperBuild()
	}
	code := m.Run()
	waitDerperBuild() // before its directory goes
	os.RemoveAll(dir)
	os.Exit(code)
}
