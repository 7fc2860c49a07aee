package packaging

import (
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	sigsyaml "sigs.k8s.io/yaml"
)

// The configurations of docs/DEPLOY.md, "Sharing port 443 with websites",
// are checked against the relay's settings shown there (the binary must
// accept them) and, where the proxy is installed, by the proxy itself:
// `haproxy -c` and `nginx -t` are real syntax and semantic checks, run
// offline; nothing listens. Traefik has no binary here: its YAML is
// decoded strictly into the fields the docs use.

// proxyDoc is what the section shows: the relay's command line and each
// proxy's configuration, found by the comment each block starts with.
type proxyDoc struct {
	relayArgs   []string
	haproxy     string
	nginxStream string
	nginxHTTP   string
	traefik     string
}

func loadProxyDoc(t *testing.T) proxyDoc {
	t.Helper()
	doc := readRepoFile(t, "docs/DEPLOY.md")
	start := strings.Index(doc, "\n## Sharing port 443 with websites\n")
	if start < 0 {
		t.Fatal(`docs/DEPLOY.md: no section "## Sharing port 443 with websites"`)
	}
	sec := doc[start+1:]
	if end := strings.Index(sec[3:], "\n## "); end >= 0 {
		sec = sec[:end+3]
	}
	var d proxyDoc
	for _, m := range regexp.MustCompile("(?s)```[a-z]*\n(.*?)```").FindAllStringSubmatch(sec, -1) {
		block := m[1]
		first, _, _ := strings.Cut(block, "\n")
		switch {
		case strings.HasPrefix(first, "# /etc/haproxy/haproxy.cfg"):
			d.haproxy = block
		case strings.HasPrefix(first, "# /etc/nginx/nginx.conf"):
			d.nginxStream = block
		case strings.HasPrefix(first, "# /etc/nginx/sites-available/"):
			d.nginxHTTP = block
		case strings.HasPrefix(first, "# /etc/traefik/"):
			d.traefik = block
		case strings.HasPrefix(first, "# tailderp behind"):
			for _, line := range strings.Split(block, "\n") {
				if f := strings.Fields(line); len(f) > 0 && f[0] == "tailderp" {
					d.relayArgs = f[1:]
				}
			}
		}
	}
	for name, v := range map[string]bool{"relay command line": d.relayArgs != nil, "HAProxy": d.haproxy != "", "nginx stream": d.nginxStream != "", "nginx port 80": d.nginxHTTP != "", "Traefik": d.traefik != ""} {
		if !v {
			t.Errorf("docs/DEPLOY.md, Sharing port 443: no %s block", name)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	return d
}

// proxyRelay is the relay's side as the docs' command line sets it.
type proxyRelay struct {
	hostname   string
	httpsPort  string
	httpPort   string
	proxyFrom  []netip.Prefix
	listenHost string
}

func (d proxyDoc) relay(t *testing.T) proxyRelay {
	t.Helper()
	get := func(flag string) string {
		for i, a := range d.relayArgs {
			if a == "-"+flag && i+1 < len(d.relayArgs) {
				return d.relayArgs[i+1]
			}
		}
		t.Fatalf("docs/DEPLOY.md: the relay's command line %q has no -%s", d.relayArgs, flag)
		return ""
	}
	var r proxyRelay
	r.hostname = get("hostname")
	var err error
	if r.listenHost, r.httpsPort, err = net.SplitHostPort(get("a")); err != nil {
		t.Fatalf("-a: %v", err)
	}
	r.httpPort = get("http-port")
	for _, e := range strings.Split(get("proxy-protocol-from"), ",") {
		p, err := netip.ParsePrefix(e)
		if err != nil {
			a, aerr := netip.ParseAddr(e)
			if aerr != nil {
				t.Fatalf("-proxy-protocol-from %q: %v", e, err)
			}
			p = netip.PrefixFrom(a, a.BitLen())
		}
		r.proxyFrom = append(r.proxyFrom, p)
	}
	return r
}

// TestProxyConfigs: the relay's settings in "Sharing port 443 with
// websites" are accepted by the binary and avoid the two traps (STUN on
// loopback only; a derpMap naming -a's port, not the proxy's 443); each
// proxy sends the relay's hostname to the
// relay's HTTPS port at an address -proxy-protocol-from lists, with a
// PROXY header, and port 80 to its HTTP port; HAProxy and nginx accept
// their configurations (and refuse a broken one, so the check can fail).
func TestProxyConfigs(t *testing.T) {
	d := loadProxyDoc(t)
	r := d.relay(t)

	// The binary accepts the settings (derpmap loads and validates them).
	args := append([]string{"derpmap", "-state-dir", t.TempDir(), "-verify-clients=false"}, d.relayArgs...)
	code, stdout, stderr := runBinary(t, nil, args...)
	if code != 0 {
		t.Errorf("tailderp %q: exit %d\n%s", args, code, stderr)
	}
	// Clients dial the proxy's 443: the derpMap must not name -a's port.
	if strings.Contains(stdout, `"DERPPort"`) {
		t.Errorf("tailderp %q prints a DERPPort (clients would dial -a's port, not the proxy's 443): add -public-port 443\n%s", args, stdout)
	}
	if a, err := netip.ParseAddr(r.listenHost); err == nil && a.IsLoopback() {
		t.Errorf("-a %s: STUN listens on the HTTPS listener's IP, so it would answer on loopback only", net.JoinHostPort(r.listenHost, r.httpsPort))
	}
	// upstream checks that hostport is the relay's HTTPS port at an
	// address it takes PROXY headers from.
	upstream := func(name, hostport string) {
		t.Helper()
		host, port, err := net.SplitHostPort(hostport)
		if err != nil {
			t.Errorf("%s: relay upstream %q: %v", name, hostport, err)
			return
		}
		a, err := netip.ParseAddr(host)
		listed := false
		for _, p := range r.proxyFrom {
			listed = listed || (err == nil && p.Contains(a))
		}
		if port != r.httpsPort || !listed {
			t.Errorf("%s: relay upstream %s; want port %s (-a) at an address -proxy-protocol-from %v lists (the proxy connects from it)", name, hostport, r.httpsPort, r.proxyFrom)
		}
	}
	httpUpstream := "127.0.0.1:" + r.httpPort

	t.Run("haproxy", func(t *testing.T) {
		c := d.haproxy
		m := regexp.MustCompile(`(?m)^\s*server relay (\S+) send-proxy-v2\s*$`).FindStringSubmatch(c)
		if m == nil {
			t.Fatalf("no `server relay ADDR send-proxy-v2` line:\n%s", c)
		}
		upstream("HAProxy", m[1])
		for _, want := range []string{"mode tcp", "req.ssl_sni -i " + r.hostname, "server relay " + httpUpstream + "\n", "-i " + r.hostname + " }"} {
			if !strings.Contains(c, want) {
				t.Errorf("HAProxy configuration lacks %q", want)
			}
		}
		haproxy, err := exec.LookPath("haproxy")
		if err != nil {
			t.Skip("haproxy is not installed (Debian's haproxy): the configuration's syntax was not checked")
		}
		check := func(cfg string) (string, error) {
			path := filepath.Join(t.TempDir(), "haproxy.cfg")
			if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
				t.Fatal(err)
			}
			out, err := exec.Command(haproxy, "-c", "-f", path).CombinedOutput()
			return string(out), err
		}
		if out, err := check(c); err != nil {
			t.Errorf("haproxy -c: %v\n%s", err, out)
		}
		if out, err := check(strings.Replace(c, "send-proxy-v2", "send-proxy-v3", 1)); err == nil {
			t.Errorf("haproxy -c accepts an unknown server keyword: it checks nothing\n%s", out)
		}
	})

	t.Run("nginx", func(t *testing.T) {
		m := regexp.MustCompile(`(?s)upstream tailderp \{.*?server (\S+);`).FindStringSubmatch(d.nginxStream)
		if m == nil {
			t.Fatalf("no `upstream tailderp { server ADDR; }`:\n%s", d.nginxStream)
		}
		upstream("nginx", m[1])
		for _, want := range []string{"ssl_preread on;", "proxy_protocol on;", r.hostname + "  tailderp;"} {
			if !strings.Contains(d.nginxStream, want) {
				t.Errorf("nginx stream configuration lacks %q", want)
			}
		}
		for _, want := range []string{"server_name " + r.hostname + ";", "proxy_pass http://" + httpUpstream + ";"} {
			if !strings.Contains(d.nginxHTTP, want) {
				t.Errorf("nginx port-80 configuration lacks %q", want)
			}
		}
		nginx, err := exec.LookPath("nginx")
		if err != nil {
			t.Skip("nginx is not installed (Debian's nginx-light and libnginx-mod-stream): the configuration's syntax was not checked")
		}
		// Debian builds the stream module as a dynamic module, loaded
		// from modules-enabled; a build with it compiled in needs nothing.
		load := ""
		if out, _ := exec.Command(nginx, "-V").CombinedOutput(); strings.Contains(string(out), "--with-stream=dynamic") {
			const mod = "/usr/lib/nginx/modules/ngx_stream_module.so"
			if _, err := os.Stat(mod); err != nil {
				t.Fatalf("nginx has a dynamic stream module, but %s is missing: install libnginx-mod-stream", mod)
			}
			load = "load_module " + mod + ";\n"
		}
		check := func(stream string) (string, error) {
			dir := t.TempDir()
			if err := os.Mkdir(filepath.Join(dir, "logs"), 0o755); err != nil {
				t.Fatal(err)
			}
			cfg := load + "events {}\n" + stream + "http {\n" + d.nginxHTTP + "}\n"
			path := filepath.Join(dir, "nginx.conf")
			if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
				t.Fatal(err)
			}
			out, err := exec.Command(nginx, "-t", "-q", "-e", "stderr", "-p", dir+"/", "-c", path, "-g", "pid "+filepath.Join(dir, "nginx.pid")+";").CombinedOutput()
			return string(out), err
		}
		if out, err := check(d.nginxStream); err != nil {
			t.Errorf("nginx -t: %v\n%s", err, out)
		}
		if out, err := check(strings.Replace(d.nginxStream, "ssl_preread on;", "ssl_preread maybe;", 1)); err == nil {
			t.Errorf("nginx -t accepts `ssl_preread maybe;`: it checks nothing\n%s", out)
		}
	})

	t.Run("traefik", func(t *testing.T) {
		// The fields the docs use, decoded strictly: a misspelt key fails.
		// Traefik's own schema is not checked (no binary here).
		type lb struct {
			ServersTransport string `json:"serversTransport,omitempty"`
			Servers          []struct {
				Address string `json:"address,omitempty"`
				URL     string `json:"url,omitempty"`
			} `json:"servers"`
		}
		type router struct {
			EntryPoints []string `json:"entryPoints"`
			Rule        string   `json:"rule"`
			Service     string   `json:"service"`
			TLS         *struct {
				Passthrough bool `json:"passthrough"`
			} `json:"tls,omitempty"`
		}
		var cfg struct {
			TCP struct {
				Routers  map[string]router `json:"routers"`
				Services map[string]struct {
					LoadBalancer lb `json:"loadBalancer"`
				} `json:"services"`
				ServersTransports map[string]struct {
					ProxyProtocol struct {
						Version int `json:"version"`
					} `json:"proxyProtocol"`
				} `json:"serversTransports"`
			} `json:"tcp"`
			HTTP struct {
				Routers  map[string]router `json:"routers"`
				Services map[string]struct {
					LoadBalancer lb `json:"loadBalancer"`
				} `json:"services"`
			} `json:"http"`
		}
		if err := sigsyaml.UnmarshalStrict([]byte(d.traefik), &cfg); err != nil {
			t.Fatalf("Traefik YAML: %v", err)
		}
		found := false
		for name, rt := range cfg.TCP.Routers {
			if rt.Rule != "HostSNI(`"+r.hostname+"`)" {
				continue
			}
			found = true
			if rt.TLS == nil || !rt.TLS.Passthrough {
				t.Errorf("TCP router %s: want tls.passthrough: true (the relay terminates TLS)", name)
			}
			svc, ok := cfg.TCP.Services[rt.Service]
			if !ok || len(svc.LoadBalancer.Servers) != 1 {
				t.Errorf("TCP router %s: service %q with one server not defined", name, rt.Service)
				continue
			}
			upstream("Traefik", svc.LoadBalancer.Servers[0].Address)
			if st, ok := cfg.TCP.ServersTransports[svc.LoadBalancer.ServersTransport]; !ok || st.ProxyProtocol.Version != 2 {
				t.Errorf("TCP service %s: serversTransport %q without proxyProtocol version 2", rt.Service, svc.LoadBalancer.ServersTransport)
			}
		}
		if !found {
			t.Errorf("no TCP router with rule HostSNI(`%s`)", r.hostname)
		}
		found = false
		for name, rt := range cfg.HTTP.Routers {
			if rt.Rule != "Host(`"+r.hostname+"`)" {
				continue
			}
			found = true
			svc := cfg.HTTP.Services[rt.Service]
			if len(svc.LoadBalancer.Servers) != 1 || svc.LoadBalancer.Servers[0].URL != "http://"+httpUpstream {
				t.Errorf("HTTP router %s: service %q; want one server http://%s (the relay's -http-port)", name, rt.Service, httpUpstream)
			}
		}
		if !found {
			t.Errorf("no HTTP router with rule Host(`%s`): ACME HTTP-01 and captive-portal checks need port 80", r.hostname)
		}
	})
}
