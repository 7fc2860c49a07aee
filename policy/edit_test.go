package policy

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"

	"tailscale.com/tailcfg"

	"github.com/tailderp/tailderp/internal/testpolicy"
)

// policyFile is a policy file as people keep them (testpolicy.PolicyFile).
const policyFile = testpolicy.PolicyFile

func region900(host string, port int) *tailcfg.DERPRegion {
	return &tailcfg.DERPRegion{
		RegionID: 900, RegionCode: "tailderp", RegionName: "tailderp",
		Nodes: []*tailcfg.DERPNode{{Name: "900a", RegionID: 900, HostName: host, DERPPort: port, CertName: "sha256-raw:00ff"}},
	}
}

// regionsOf decodes derpMap.Regions of a HuJSON file.
func regionsOf(t *testing.T, file []byte) map[string]*tailcfg.DERPRegion {
	return testpolicy.Regions(t, file)
}

// without returns file with the text of region 900 cut out: what must be
// left byte for byte.
func cutRegion900(t *testing.T, file string) string {
	t.Helper()
	start := strings.Index(file, `"900": {`)
	if start < 0 {
		t.Fatalf("no region 900 in\n%s", file)
	}
	// The region ends at the first line that closes it at its indentation.
	lineStart := strings.LastIndexByte(file[:start], '\n') + 1
	indent := file[lineStart:start]
	end := strings.Index(file[start:], "\n"+indent+"}")
	if end < 0 {
		t.Fatalf("region 900 does not end in\n%s", file)
	}
	end += start + len("\n"+indent+"}")
	return file[:lineStart] + file[end:]
}

func TestSetRegionAddsAndKeepsEverythingElse(t *testing.T) {
	out, err := SetRegion(region900("relay.example", 8443))([]byte(policyFile))
	if err != nil {
		t.Fatal(err)
	}
	regs := regionsOf(t, out)
	if got, want := regs["900"], region900("relay.example", 8443); !reflect.DeepEqual(got, want) {
		t.Errorf("region 900 = %+v, want %+v", got, want)
	}
	if regs["901"] == nil || regs["901"].Nodes[0].HostName != "derp.office.example" {
		t.Errorf("region 901 lost: %+v", regs["901"])
	}
	// Outside the new region (its line, its trailing comma), nothing moved.
	rest := cutRegion900(t, string(out))
	rest = strings.Replace(rest, "\n,", "", 1) // the new member's comma
	if rest != policyFile {
		t.Errorf("bytes outside region 900 changed:\n%s\nwant\n%s", rest, policyFile)
	}
	// Indented like its neighbour, with tabs.
	if !strings.Contains(string(out), "\n\t\t\t\"900\": {\n\t\t\t\t\"RegionID\": 900,") {
		t.Errorf("region 900 not indented like 901:\n%s", out)
	}
	t.Logf("\n%s", out)
}

func TestSetRegionReplacesOnlyItsRegion(t *testing.T) {
	first, err := SetRegion(region900("relay.example", 0))([]byte(policyFile))
	if err != nil {
		t.Fatal(err)
	}
	second, err := SetRegion(region900("relay2.example", 0))(first)
	if err != nil {
		t.Fatal(err)
	}
	if got := regionsOf(t, second)["900"].Nodes[0].HostName; got != "relay2.example" {
		t.Errorf("HostName = %q after replace", got)
	}
	if a, b := cutRegion900(t, string(first)), cutRegion900(t, string(second)); a != b {
		t.Errorf("replacing region 900 changed other bytes:\n%s\nvs\n%s", a, b)
	}
	if n := strings.Count(string(second), `"900"`); n != 1 {
		t.Errorf("region 900 appears %d times", n)
	}
}

func TestSetRegionSameIsNoChange(t *testing.T) {
	first, err := SetRegion(region900("relay.example", 0))([]byte(policyFile))
	if err != nil {
		t.Fatal(err)
	}
	// Same values, other formatting and a comment inside: still the same.
	reformatted := strings.Replace(string(first), `"RegionID": 900,`, `"RegionID":900, // ours`, 1)
	for _, in := range []string{string(first), reformatted} {
		out, err := SetRegion(region900("relay.example", 0))([]byte(in))
		if err != nil {
			t.Fatal(err)
		}
		if string(out) != in {
			t.Errorf("an equal region was rewritten:\n%s", out)
		}
	}
}

func TestSetRegionCreatesDERPMap(t *testing.T) {
	for name, in := range map[string]string{
		"no derpMap":        "{\n  // only acls\n  \"acls\": [],\n}\n",
		"no Regions":        "{\n\t\"derpMap\": {\"OmitDefaultRegions\": true},\n}",
		"empty":             "{}",
		"lowercase regions": "{\"derpMap\": {\"regions\": {\"901\": {\"regionID\": 901, \"nodes\": [{\"hostName\": \"a\"}]}}}}",
		"json":              "{\n    \"acls\": [\n        {\"action\": \"accept\"}\n    ]\n}\n",
	} {
		t.Run(name, func(t *testing.T) {
			out, err := SetRegion(region900("relay.example", 0))([]byte(in))
			if err != nil {
				t.Fatal(err)
			}
			if got := regionsOf(t, out)["900"]; got == nil || got.Nodes[0].HostName != "relay.example" {
				t.Fatalf("no region 900 in\n%s", out)
			}
			if strings.Count(strings.ToLower(string(out)), `"regions"`) != 1 {
				t.Errorf("a second Regions was added:\n%s", out)
			}
			t.Logf("\n%s", out)
		})
	}
	// A strict JSON file stays strict JSON: no trailing commas added.
	out, err := SetRegion(region900("relay.example", 0))([]byte("{\n    \"acls\": []\n}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if !json.Valid(out) {
		t.Errorf("a JSON file became HuJSON:\n%s", out)
	}
	if !strings.Contains(string(out), "\n    \"derpMap\": {\n        \"Regions\": {") {
		t.Errorf("not indented with the file's 4 spaces:\n%s", out)
	}
}

func TestRemoveNode(t *testing.T) {
	two := region900("a.example", 0)
	b := *two.Nodes[0]
	b.Name, b.HostName, b.DERPPort = "900b", "b.example", 8443
	two.Nodes = append(two.Nodes, &b)
	file, err := SetRegion(two)([]byte(policyFile))
	if err != nil {
		t.Fatal(err)
	}

	// Not there (wrong host, wrong port, wrong region): no change.
	for _, e := range []Edit{RemoveNode(900, "c.example", 0), RemoveNode(900, "b.example", 443), RemoveNode(902, "a.example", 0)} {
		out, err := e(file)
		if err != nil || string(out) != string(file) {
			t.Errorf("removing an absent node changed the file (err %v):\n%s", err, out)
		}
	}

	// One of two: the other stays, the region stays.
	out, err := RemoveNode(900, "B.example", 8443)(file)
	if err != nil {
		t.Fatal(err)
	}
	r := regionsOf(t, out)["900"]
	if r == nil || len(r.Nodes) != 1 || r.Nodes[0].HostName != "a.example" {
		t.Fatalf("after removing b: %+v\n%s", r, out)
	}
	// The last one (port 0 means 443): the region goes, 901 and the rest stay.
	out, err = RemoveNode(900, "a.example", 443)(out)
	if err != nil {
		t.Fatal(err)
	}
	regs := regionsOf(t, out)
	if _, ok := regs["900"]; ok {
		t.Fatalf("region 900 still there:\n%s", out)
	}
	if string(out) != policyFile {
		t.Errorf("adding then removing region 900 did not give back the file:\n%s", out)
	}
}

func TestEditRefusesWhatIsNotAPolicyFile(t *testing.T) {
	for _, in := range []string{"", "[]", "{", `{"derpMap": []}`, `{"derpMap": {"Regions": 1}}`} {
		if _, err := SetRegion(region900("a", 0))([]byte(in)); err == nil {
			t.Errorf("SetRegion(%q) = nil error", in)
		}
	}
	if _, err := SetRegion(&tailcfg.DERPRegion{RegionID: 900})([]byte("{}")); err == nil {
		t.Error("a region without nodes was accepted")
	}
}
