package policy

import (
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"
	"testing"
)

// patchUnified applies a unified diff made by Diff to a, checking every
// context and removed line against a: what `patch` would do.
func patchUnified(t *testing.T, a, diff string) string {
	t.Helper()
	src := lines(a)
	d := lines(diff)
	if len(d) < 2 || !strings.HasPrefix(d[0], "--- ") || !strings.HasPrefix(d[1], "+++ ") {
		t.Fatalf("no header in\n%s", diff)
	}
	var out []string
	next := 0 // next line of src (0-based) not yet copied
	for i := 2; i < len(d); {
		var as, al, bs, bl int
		if _, err := fmt.Sscanf(d[i], "@@ -%d,%d +%d,%d @@\n", &as, &al, &bs, &bl); err != nil {
			t.Fatalf("bad hunk header %q: %v", d[i], err)
		}
		i++
		start := as - 1
		if al == 0 {
			start = as // an empty side names the line before
		}
		if start < next {
			t.Fatalf("hunks overlap at %q", d[i-1])
		}
		out = append(out, src[next:start]...)
		next = start
		var gotA, gotB int
		for i < len(d) && !strings.HasPrefix(d[i], "@@") {
			l := d[i]
			i++
			text := l[1:]
			if i < len(d) && d[i] == "\\ No newline at end of file\n" {
				text = strings.TrimSuffix(text, "\n")
				i++
			}
			switch l[0] {
			case ' ', '-':
				if next >= len(src) || src[next] != text {
					t.Fatalf("line %d: diff says %q, file has %q", next+1, text, src[min(next, len(src)-1)])
				}
				next++
				gotA++
				if l[0] == ' ' {
					out = append(out, text)
					gotB++
				}
			case '+':
				out = append(out, text)
				gotB++
			default:
				t.Fatalf("bad diff line %q", l)
			}
		}
		if gotA != al || gotB != bl {
			t.Fatalf("hunk counts %d,%d, header says %d,%d", gotA, gotB, al, bl)
		}
	}
	out = append(out, src[next:]...)
	return strings.Join(out, "")
}

func TestDiffAppliesBack(t *testing.T) {
	edited, err := SetRegion(region900("relay.example", 0))([]byte(policyFile))
	if err != nil {
		t.Fatal(err)
	}
	cases := [][2]string{
		{policyFile, string(edited)},
		{string(edited), policyFile},
		{"", "a\n"},
		{"a\n", ""},
		{"a\nb\nc", "a\nB\nc"},
		{"x", "y"},
	}
	// Random edits of a longer file: several hunks, near and far apart.
	r := rand.New(rand.NewPCG(1, 2))
	for k := 0; k < 200; k++ {
		var a, b []string
		for i := 0; i < 40; i++ {
			l := "line " + strconv.Itoa(i) + "\n"
			a = append(a, l)
			switch r.IntN(10) {
			case 0: // dropped
			case 1:
				b = append(b, "changed "+l)
			case 2:
				b = append(b, l, "added after "+l)
			default:
				b = append(b, l)
			}
		}
		cases = append(cases, [2]string{strings.Join(a, ""), strings.Join(b, "")})
	}
	for _, c := range cases {
		d := Diff("a", "b", []byte(c[0]), []byte(c[1]))
		if c[0] == c[1] {
			if d != "" {
				t.Errorf("diff of equal files: %q", d)
			}
			continue
		}
		if got := patchUnified(t, c[0], d); got != c[1] {
			t.Fatalf("applying the diff gives\n%q\nwant\n%q\ndiff:\n%s", got, c[1], d)
		}
	}
}
