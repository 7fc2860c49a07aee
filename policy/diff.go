package policy

import (
	"fmt"
	"strings"
)

// Diff is a unified diff (3 lines of context) from a to b, labelled with
// the two names; "" when they are equal. It is a plain line diff: enough
// to show an operator which lines of the policy file an edit changes.
func Diff(nameA, nameB string, a, b []byte) string {
	if string(a) == string(b) {
		return ""
	}
	x, y := lines(string(a)), lines(string(b))
	ops := diffLines(x, y)
	var out strings.Builder
	fmt.Fprintf(&out, "--- %s\n+++ %s\n", nameA, nameB)
	const ctx = 3
	// Walk the ops, cutting them into hunks around the changes.
	for i := 0; i < len(ops); {
		if ops[i].kind == ' ' {
			i++
			continue
		}
		start := max(i-ctx, 0)
		for start < i && ops[start].kind != ' ' {
			start++
		}
		end := i
		for end < len(ops) {
			if ops[end].kind != ' ' {
				end++
				continue
			}
			// Run of equal lines: end the hunk if it is long enough.
			run := end
			for run < len(ops) && ops[run].kind == ' ' {
				run++
			}
			if run == len(ops) || run-end > 2*ctx {
				end = min(end+ctx, run)
				break
			}
			end = run
		}
		writeHunk(&out, ops[start:end])
		i = end
	}
	return out.String()
}

type lineOp struct {
	kind byte // ' ', '-', '+'
	text string
	ai   int // line number in a (1-based) of ' ' and '-'
	bi   int // line number in b of ' ' and '+'
}

func writeHunk(out *strings.Builder, ops []lineOp) {
	var aStart, aLen, bStart, bLen int
	for _, o := range ops {
		if o.kind != '+' {
			if aLen == 0 {
				aStart = o.ai
			}
			aLen++
		}
		if o.kind != '-' {
			if bLen == 0 {
				bStart = o.bi
			}
			bLen++
		}
	}
	// An empty side names the line before it (unified diff convention).
	if aLen == 0 {
		aStart = ops[0].ai - 1
	}
	if bLen == 0 {
		bStart = ops[0].bi - 1
	}
	fmt.Fprintf(out, "@@ -%d,%d +%d,%d @@\n", aStart, aLen, bStart, bLen)
	for _, o := range ops {
		out.WriteByte(o.kind)
		out.WriteString(o.text)
		if !strings.HasSuffix(o.text, "\n") {
			out.WriteString("\n\\ No newline at end of file\n")
		}
	}
}

// lines splits s after each newline, keeping them.
func lines(s string) []string {
	var l []string
	for s != "" {
		i := strings.IndexByte(s, '\n')
		if i < 0 {
			l = append(l, s)
			break
		}
		l = append(l, s[:i+1])
		s = s[i+1:]
	}
	return l
}

// diffLines is a longest-common-subsequence line diff. The common head and
// tail are cut off first, so the table covers only the changed middle —
// for a region edit, a few dozen lines.
func diffLines(x, y []string) []lineOp {
	pre := 0
	for pre < len(x) && pre < len(y) && x[pre] == y[pre] {
		pre++
	}
	suf := 0
	for suf < len(x)-pre && suf < len(y)-pre && x[len(x)-1-suf] == y[len(y)-1-suf] {
		suf++
	}
	mx, my := x[pre:len(x)-suf], y[pre:len(y)-suf]
	var ops []lineOp
	for i := 0; i < pre; i++ {
		ops = append(ops, lineOp{' ', x[i], i + 1, i + 1})
	}
	ai, bi := pre+1, pre+1
	if len(mx)*len(my) > 4<<20 {
		// Too large a middle for the table: show it replaced whole.
		for _, l := range mx {
			ops = append(ops, lineOp{'-', l, ai, 0})
			ai++
		}
		for _, l := range my {
			ops = append(ops, lineOp{'+', l, 0, bi})
			bi++
		}
	} else {
		// lcs[i][j] is the LCS length of mx[i:] and my[j:].
		lcs := make([][]int32, len(mx)+1)
		for i := range lcs {
			lcs[i] = make([]int32, len(my)+1)
		}
		for i := len(mx) - 1; i >= 0; i-- {
			for j := len(my) - 1; j >= 0; j-- {
				if mx[i] == my[j] {
					lcs[i][j] = lcs[i+1][j+1] + 1
				} else {
					lcs[i][j] = max(lcs[i+1][j], lcs[i][j+1])
				}
			}
		}
		i, j := 0, 0
		for i < len(mx) || j < len(my) {
			switch {
			case i < len(mx) && j < len(my) && mx[i] == my[j]:
				ops = append(ops, lineOp{' ', mx[i], ai, bi})
				i, j, ai, bi = i+1, j+1, ai+1, bi+1
			case j < len(my) && (i == len(mx) || lcs[i][j+1] >= lcs[i+1][j]):
				ops = append(ops, lineOp{'+', my[j], 0, bi})
				j, bi = j+1, bi+1
			default:
				ops = append(ops, lineOp{'-', mx[i], ai, 0})
				i, ai = i+1, ai+1
			}
		}
	}
	for k := 0; k < suf; k++ {
		ops = append(ops, lineOp{' ', x[len(x)-suf+k], ai, bi})
		ai, bi = ai+1, bi+1
	}
	// Fill the line numbers an op of the other side lacks, so a hunk
	// whose side is empty can name the line before it.
	lastA, lastB := 0, 0
	for k := range ops {
		if ops[k].kind == '+' {
			ops[k].ai = lastA + 1
		} else {
			lastA = ops[k].ai
		}
		if ops[k].kind == '-' {
			ops[k].bi = lastB + 1
		} else {
			lastB = ops[k].bi
		}
	}
	return ops
}
